variable "cluster_name" {
  description = "Name of the EKS cluster the ShCR chart is installed in (for the Pod Identity associations and the role trust)."
  type        = string

  validation {
    condition     = can(regex("^[0-9A-Za-z][A-Za-z0-9_-]{0,99}$", var.cluster_name))
    error_message = "cluster_name must be an EKS cluster name: 1 to 100 letters, digits, '-' and '_', starting with a letter or digit."
  }
}

variable "namespace" {
  description = "Namespace the shcr chart is installed in (the operator's and gateway's namespace)."
  type        = string
  default     = "shcr-system"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.namespace)) && length(var.namespace) <= 63
    error_message = "namespace must be a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters)."
  }
}

variable "operator_service_account" {
  description = "Name of the operator's ServiceAccount: the chart's `<fullname>-operator`, i.e. shcr-operator for a release named shcr (or operator.serviceAccount.name)."
  type        = string
  default     = "shcr-operator"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", var.operator_service_account)) && length(var.operator_service_account) <= 253
    error_message = "operator_service_account must be a valid Kubernetes ServiceAccount name."
  }
}

variable "bucket_prefix" {
  description = "Prefix of every bucket the operator may create and manage. The operator names the buckets it creates shcr-<name>-<uid>, so keep the default unless every CareSystem sets spec.storage.bucketName under another prefix."
  type        = string
  default     = "shcr-"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,19}-$", var.bucket_prefix))
    error_message = "bucket_prefix must be 2 to 21 lower-case letters, digits and '-', ending with '-', e.g. shcr-."
  }
}

variable "allow_operator_deletion" {
  description = "Let the operator empty and delete buckets and schedule the deletion of its own KMS keys, which `deletionPolicy: Delete` needs. false: a deleted CareSystem always keeps its bucket and key, whatever its deletionPolicy (the deletion is reported as blocked)."
  type        = bool
  default     = true
}

variable "create_pod_identity_associations" {
  description = "Create the EKS Pod Identity association of the operator's ServiceAccount. false: associate the role yourself (or annotate the ServiceAccount for IRSA after adding a web-identity trust)."
  type        = bool
  default     = true
}

variable "iam_role_path" {
  description = "Path of the IAM roles this module creates."
  type        = string
  default     = "/shcr/"

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.iam_role_path))
    error_message = "iam_role_path must start and end with '/', e.g. /shcr/."
  }
}

variable "iam_role_name" {
  description = "Name of the operator's IAM role."
  type        = string
  default     = "shcr-operator"

  validation {
    condition     = can(regex("^[A-Za-z0-9+=,.@_-]{1,64}$", var.iam_role_name))
    error_message = "iam_role_name must be 1 to 64 letters, digits and +=,.@_-."
  }
}

variable "iam_role_permissions_boundary" {
  description = "ARN of a permissions boundary policy for the operator's IAM role; null: none."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for every resource this module creates."
  type        = map(string)
  default     = {}
}
