# The complete ShCR AWS setup: the platform's operator role, and care systems whose storage
# Terraform owns, each adopted by its CareSystem (see outputs.care_system_values).

provider "aws" {
  region = var.region
}

module "platform" {
  source = "../../modules/platform"

  cluster_name = var.cluster_name
  tags         = var.tags
}

module "care_system" {
  source   = "../../modules/care-system"
  for_each = var.care_systems

  name          = each.key
  ods_code      = each.value.ods_code
  cluster_name  = var.cluster_name
  bucket_prefix = module.platform.bucket_prefix
  tags          = var.tags
}
