output "operator_role_arn" {
  description = "ARN of the operator's IAM role."
  value       = module.platform.operator_role_arn
}

output "shcr_chart_values" {
  description = "Values for the shcr chart (`terraform output -json shcr_chart_values > platform.values.json`)."
  value       = module.platform.helm_values
}

output "care_system_values" {
  description = "Per care system, complete values for the care-system chart, adopting the Terraform-owned bucket and key."
  value = {
    for name, cs in module.care_system : name => {
      name           = name
      odsCode        = var.care_systems[name].ods_code
      displayName    = var.care_systems[name].display_name
      members        = var.care_systems[name].members
      storage        = cs.care_system_spec.storage
      encryption     = cs.care_system_spec.encryption
      deletionPolicy = cs.care_system_spec.deletionPolicy
    }
  }
}

output "store_role_arns" {
  description = "Per care system, the ARN of its store's IAM role."
  value       = { for name, cs in module.care_system : name => cs.store_role_arn }
}
