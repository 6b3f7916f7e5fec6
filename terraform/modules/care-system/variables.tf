################################################################################
# The care system
################################################################################

variable "name" {
  description = "Name of the CareSystem (metadata.name). The operator runs its store in the namespace `care-<name>`, tags the bucket and key with it and looks the key up by `alias/shcr/<name>`."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.name)) && length(var.name) <= 58
    error_message = "name must be a DNS-1123 label of at most 58 characters (lower-case letters, digits and '-', starting and ending with a letter or digit): the store's namespace is care-<name>."
  }
}

variable "ods_code" {
  description = "ODS code of the care system's commissioning organisation (spec.odsCode of the CareSystem), e.g. the ICB code `QWO`. Used in the key's description and tags."
  type        = string

  validation {
    condition     = can(regex("^[A-Z0-9]{3,10}$", var.ods_code))
    error_message = "ods_code must be 3 to 10 upper-case letters and digits, e.g. QWO (the CareSystem CRD enforces the same pattern)."
  }
}

variable "tags" {
  description = "Tags for the KMS key, the IAM role and the Pod Identity association. Not applied to the bucket: the operator owns the bucket's tag set and rewrites it to the two ShCR tags on every reconcile."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for key in keys(var.tags) : !startswith(key, "shcr.dev/")])
    error_message = "Tags starting with shcr.dev/ are set by this module and the operator; remove them from tags."
  }
}

################################################################################
# Bucket
################################################################################

variable "create_bucket" {
  description = "Create the care system's bucket. false: the bucket is the operator's (or exists already) and `bucket_name` names it, so that the store role can be scoped to it."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Name of the bucket. Default when creating: `<bucket_prefix><name>-<account id>`. Required when create_bucket is false (take it from the CareSystem's status.bucket, or set spec.storage.bucketName)."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must follow the S3 naming rules: 3 to 63 lower-case letters, digits, '.' and '-', starting and ending with a letter or digit."
  }
}

variable "bucket_prefix" {
  description = "Prefix every ShCR bucket name starts with. Must equal the platform module's bucket_prefix: the operator may configure only buckets under it, and it re-applies the bucket's settings on every reconcile."
  type        = string
  default     = "shcr-"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,19}-$", var.bucket_prefix))
    error_message = "bucket_prefix must be 2 to 21 lower-case letters, digits and '-', ending with '-', e.g. shcr-."
  }
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket with every record version in it. Leave false for real care systems: the records are the point."
  type        = bool
  default     = false
}

################################################################################
# KMS key
################################################################################

variable "create_kms_key" {
  description = "Create the care system's KMS key (alias `alias/shcr/<name>`, automatic rotation). false: `kms_key_arn` names an existing key."
  type        = bool
  default     = true
}

variable "kms_key_arn" {
  description = "ARN of an existing symmetric KMS key to use when create_kms_key is false (the CareSystem's status.kmsKeyArn, or a key of your own named in spec.encryption.kmsKeyArn)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>); aliases are not accepted because IAM policies match key ARNs."
  }
}

variable "kms_key_rotation_period_in_days" {
  description = "Days between automatic rotations of the created key's material (90 to 2560). Old material stays available for decryption, so rotation never needs a re-encryption."
  type        = number
  default     = 365

  validation {
    condition     = var.kms_key_rotation_period_in_days >= 90 && var.kms_key_rotation_period_in_days <= 2560
    error_message = "kms_key_rotation_period_in_days must be between 90 and 2560."
  }
}

variable "kms_key_deletion_window_in_days" {
  description = "Days the created key stays pending deletion after `terraform destroy` (7 to 30). During the window the deletion can be cancelled; after it every record encrypted under the key is unreadable."
  type        = number
  default     = 30

  validation {
    condition     = var.kms_key_deletion_window_in_days >= 7 && var.kms_key_deletion_window_in_days <= 30
    error_message = "kms_key_deletion_window_in_days must be between 7 and 30."
  }
}

################################################################################
# The store's identity (EKS Pod Identity)
################################################################################

variable "create_store_identity" {
  description = "Create the store's IAM role (access to this care system's bucket and key only) and its EKS Pod Identity association for the ServiceAccount `shcr-store` in `care-<name>`."
  type        = bool
  default     = true
}

variable "cluster_name" {
  description = "Name of the EKS cluster the ShCR operator runs in. Required when create_store_identity is true."
  type        = string
  default     = null

  validation {
    condition     = var.cluster_name == null || can(regex("^[0-9A-Za-z][A-Za-z0-9_-]{0,99}$", var.cluster_name))
    error_message = "cluster_name must be an EKS cluster name: 1 to 100 letters, digits, '-' and '_', starting with a letter or digit."
  }
}

variable "iam_role_path" {
  description = "Path of the store's IAM role."
  type        = string
  default     = "/shcr/"

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.iam_role_path))
    error_message = "iam_role_path must start and end with '/', e.g. /shcr/."
  }
}

variable "iam_role_permissions_boundary" {
  description = "ARN of a permissions boundary policy for the store's IAM role; null: none."
  type        = string
  default     = null
}
