output "operator_role_arn" {
  description = "ARN of the operator's IAM role."
  value       = aws_iam_role.operator.arn
}

output "operator_role_name" {
  description = "Name of the operator's IAM role."
  value       = aws_iam_role.operator.name
}

output "operator_pod_identity_association_id" {
  description = "ID of the operator's EKS Pod Identity association; null when create_pod_identity_associations is false."
  value       = var.create_pod_identity_associations ? aws_eks_pod_identity_association.operator[0].association_id : null
}

output "bucket_prefix" {
  description = "Prefix the operator's buckets must start with (pass it to modules/care-system)."
  value       = var.bucket_prefix
}

output "region" {
  description = "Region of the operator's KMS keys and the default for buckets."
  value       = local.region
}

output "helm_values" {
  description = "Values for the shcr chart that match these roles. With Pod Identity the ServiceAccounts need no role annotation; the gateway has no AWS identity."
  value = {
    operator = {
      serviceAccount = {
        name = var.operator_service_account
      }
      aws = {
        region = local.region
      }
    }
  }
}
