# One ShCR care system's storage, owned by Terraform: an S3 bucket and a KMS key that the
# CareSystem then adopts (spec.storage.bucketName, spec.encryption.kmsKeyArn), and the store's
# IAM role with its EKS Pod Identity association.
#
# Invariants:
# - The bucket carries exactly the two tags the operator checks before adopting a bucket
#   (shcr.dev/care-system = <name>, shcr.dev/managed-by = shcr-operator) and the settings the
#   operator re-applies on every reconcile (public access blocked, SSE-KMS with a bucket key,
#   versioning, the TLS-only policy), so Terraform and the operator agree and nothing flips.
# - The key is tagged shcr.dev/managed-by = terraform: the operator never schedules its deletion
#   (it only deletes keys tagged as its own), and a CareSystem naming it in kmsKeyArn keeps it.
# - The store role can reach this care system's bucket and key and nothing else
#   (policies/store.json.tftpl), and only pods of ServiceAccount shcr-store in care-<name> of
#   the named cluster can assume it.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name

  # Fixed by the operator (operator/src/workload.rs, care_system.rs, key.rs, cloud.rs).
  namespace             = "care-${var.name}"
  store_service_account = "shcr-store"
  kms_alias             = "alias/shcr/${var.name}"
  tag_care_system       = "shcr.dev/care-system"
  tag_managed_by        = "shcr.dev/managed-by"

  bucket_name = coalesce(var.bucket_name, "${var.bucket_prefix}${var.name}-${local.account_id}")
  bucket_arn  = "arn:${local.partition}:s3:::${local.bucket_name}"
  kms_key_arn = var.create_kms_key ? aws_kms_key.this[0].arn : var.kms_key_arn

  cluster_arn = "arn:${local.partition}:eks:${local.region}:${local.account_id}:cluster/${coalesce(var.cluster_name, "-")}"

  # IAM role names are at most 64 characters; long care system names keep a hash for uniqueness.
  store_role_name = length("shcr-store-${var.name}") <= 64 ? "shcr-store-${var.name}" : "shcr-store-${substr(var.name, 0, 44)}-${substr(sha256(var.name), 0, 8)}"
}

################################################################################
# KMS key
################################################################################

resource "aws_kms_key" "this" {
  count = var.create_kms_key ? 1 : 0

  description              = "ShCR care system ${var.name} (${var.ods_code}): record encryption"
  key_usage                = "ENCRYPT_DECRYPT"
  customer_master_key_spec = "SYMMETRIC_DEFAULT"
  enable_key_rotation      = true
  rotation_period_in_days  = var.kms_key_rotation_period_in_days
  deletion_window_in_days  = var.kms_key_deletion_window_in_days

  tags = merge(var.tags, {
    (local.tag_care_system) = var.name
    (local.tag_managed_by)  = "terraform"
    "shcr.dev/ods-code"     = var.ods_code
  })
}

resource "aws_kms_alias" "this" {
  count = var.create_kms_key ? 1 : 0

  name          = local.kms_alias
  target_key_id = aws_kms_key.this[0].key_id
}

################################################################################
# Bucket
################################################################################

resource "aws_s3_bucket" "this" {
  count = var.create_bucket ? 1 : 0

  bucket        = local.bucket_name
  force_destroy = var.force_destroy

  # Exactly the operator's adoption tags: it replaces the bucket's tag set with these on every
  # reconcile, so any other tag here would be removed and show up as drift.
  tags = {
    (local.tag_care_system) = var.name
    (local.tag_managed_by)  = "shcr-operator"
  }

  lifecycle {
    precondition {
      condition     = length(local.bucket_name) <= 63
      error_message = "The default bucket name ${local.bucket_name} is longer than 63 characters; set bucket_name (starting with ${var.bucket_prefix})."
    }
    precondition {
      condition     = startswith(local.bucket_name, var.bucket_prefix)
      error_message = "bucket_name must start with bucket_prefix (${var.bucket_prefix}): the operator's IAM policy covers only buckets under it."
    }
    precondition {
      condition     = var.create_kms_key || var.kms_key_arn != null
      error_message = "Set kms_key_arn when create_kms_key is false: the bucket's default encryption needs the care system's key."
    }
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  count = var.create_bucket ? 1 : 0

  bucket                  = aws_s3_bucket.this[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  count = var.create_bucket ? 1 : 0

  bucket = aws_s3_bucket.this[0].id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  count = var.create_bucket ? 1 : 0

  bucket = aws_s3_bucket.this[0].id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = local.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "this" {
  count = var.create_bucket ? 1 : 0

  bucket = aws_s3_bucket.this[0].id

  versioning_configuration {
    status = "Enabled"
  }
}

data "aws_iam_policy_document" "bucket" {
  count = var.create_bucket ? 1 : 0

  source_policy_documents = [
    templatefile("${path.module}/policies/bucket.json.tftpl", { bucket_name = local.bucket_name }),
  ]
}

resource "aws_s3_bucket_policy" "this" {
  count = var.create_bucket ? 1 : 0

  bucket = aws_s3_bucket.this[0].id
  policy = data.aws_iam_policy_document.bucket[0].json

  # S3 refuses a bucket policy while the public access block is being written.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

################################################################################
# The store's role and Pod Identity association
################################################################################

data "aws_iam_policy_document" "store_trust" {
  count = var.create_store_identity ? 1 : 0

  statement {
    sid     = "EksPodIdentityForThisStoreOnly"
    effect  = "Allow"
    actions = ["sts:AssumeRole", "sts:TagSession"]

    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    # EKS Pod Identity passes these session tags; an association for another cluster, namespace
    # or ServiceAccount cannot use this role.
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/eks-cluster-arn"
      values   = [local.cluster_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-namespace"
      values   = [local.namespace]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-service-account"
      values   = [local.store_service_account]
    }
  }
}

data "aws_iam_policy_document" "store" {
  count = var.create_store_identity ? 1 : 0

  # Checked before the template is rendered, so a missing input gets this message.
  lifecycle {
    precondition {
      condition     = var.cluster_name != null
      error_message = "Set cluster_name (the EKS cluster the operator runs in) when create_store_identity is true."
    }
    precondition {
      condition     = var.create_bucket || var.bucket_name != null
      error_message = "Set bucket_name when create_bucket is false: the store role is scoped to that one bucket."
    }
    precondition {
      condition     = var.create_kms_key || var.kms_key_arn != null
      error_message = "Set kms_key_arn when create_kms_key is false: the store role is scoped to that one key."
    }
  }

  source_policy_documents = [
    templatefile("${path.module}/policies/store.json.tftpl", {
      bucket_arn  = local.bucket_arn
      kms_key_arn = local.kms_key_arn
    }),
  ]
}

resource "aws_iam_role" "store" {
  count = var.create_store_identity ? 1 : 0

  name                 = local.store_role_name
  path                 = var.iam_role_path
  description          = "ShCR record store of care system ${var.name} (${var.ods_code}): its own bucket and KMS key only"
  assume_role_policy   = data.aws_iam_policy_document.store_trust[0].json
  permissions_boundary = var.iam_role_permissions_boundary

  tags = merge(var.tags, {
    (local.tag_care_system) = var.name
  })
}

resource "aws_iam_role_policy" "store" {
  count = var.create_store_identity ? 1 : 0

  name   = "shcr-store-own-bucket-and-key"
  role   = aws_iam_role.store[0].id
  policy = data.aws_iam_policy_document.store[0].json
}

resource "aws_eks_pod_identity_association" "store" {
  count = var.create_store_identity ? 1 : 0

  cluster_name    = var.cluster_name
  namespace       = local.namespace
  service_account = local.store_service_account
  role_arn        = aws_iam_role.store[0].arn

  tags = merge(var.tags, {
    (local.tag_care_system) = var.name
  })
}
