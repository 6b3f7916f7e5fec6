output "name" {
  description = "Name of the CareSystem these resources belong to."
  value       = var.name
}

output "namespace" {
  description = "Namespace the operator runs this care system's store in."
  value       = local.namespace
}

output "bucket_name" {
  description = "Name of the care system's bucket (for spec.storage.bucketName)."
  value       = var.create_bucket ? aws_s3_bucket.this[0].id : local.bucket_name
}

output "bucket_arn" {
  description = "ARN of the care system's bucket."
  value       = var.create_bucket ? aws_s3_bucket.this[0].arn : local.bucket_arn
}

output "bucket_region" {
  description = "Region of the bucket (for spec.storage.region)."
  value       = local.region
}

output "kms_key_arn" {
  description = "ARN of the care system's KMS key (for spec.encryption.kmsKeyArn)."
  value       = local.kms_key_arn
}

output "kms_key_alias" {
  description = "Alias of the created KMS key (alias/shcr/<name>); null when the key was not created here."
  value       = var.create_kms_key ? aws_kms_alias.this[0].name : null
}

output "store_role_arn" {
  description = "ARN of the store's IAM role; null when create_store_identity is false."
  value       = var.create_store_identity ? aws_iam_role.store[0].arn : null
}

output "store_pod_identity_association_id" {
  description = "ID of the store's EKS Pod Identity association; null when create_store_identity is false."
  value       = var.create_store_identity ? aws_eks_pod_identity_association.store[0].association_id : null
}

output "care_system_spec" {
  description = "The part of the CareSystem spec that adopts these resources. Use deletionPolicy Retain for Terraform-owned storage: under Delete the operator empties and deletes the bucket."
  value = {
    storage = {
      bucketName = var.create_bucket ? aws_s3_bucket.this[0].id : local.bucket_name
      region     = local.region
    }
    encryption = {
      kmsKeyArn = local.kms_key_arn
    }
    deletionPolicy = "Retain"
  }
}
