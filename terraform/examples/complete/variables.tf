variable "region" {
  description = "AWS region of the cluster, the buckets and the KMS keys, e.g. eu-west-2."
  type        = string
  default     = "eu-west-2"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", var.region))
    error_message = "region must be an AWS region name such as eu-west-2."
  }
}

variable "cluster_name" {
  description = "Name of the existing EKS cluster (with the EKS Pod Identity Agent add-on) that runs ShCR."
  type        = string
}

variable "care_systems" {
  description = "Care systems whose bucket and KMS key Terraform owns, by CareSystem name: each with its ODS code, display name and member organisations' ODS codes."
  type = map(object({
    ods_code     = string
    display_name = string
    members      = optional(list(string), [])
  }))
  default = {
    "west-yorkshire" = {
      ods_code     = "QWO"
      display_name = "West Yorkshire ICS"
      members      = ["RR8", "A81001"]
    }
  }

  validation {
    condition     = alltrue([for name, cs in var.care_systems : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name)) && length(name) <= 58])
    error_message = "Every care system name must be a DNS-1123 label of at most 58 characters."
  }

  validation {
    condition     = alltrue([for cs in values(var.care_systems) : alltrue([for code in concat([cs.ods_code], cs.members) : can(regex("^[A-Z0-9]{3,10}$", code))])])
    error_message = "Every ods_code and member must be 3 to 10 upper-case letters and digits, e.g. QWO."
  }

  validation {
    condition     = alltrue([for cs in values(var.care_systems) : length(cs.display_name) >= 1 && length(cs.display_name) <= 200])
    error_message = "Every display_name must be 1 to 200 characters."
  }
}

variable "tags" {
  description = "Tags for every resource that carries them."
  type        = map(string)
  default = {
    "project" = "shcr"
  }
}
