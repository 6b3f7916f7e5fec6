# The AWS side of the ShCR platform: the operator's IAM role (create and manage ShCR buckets and
# KMS keys, nothing else) and its EKS Pod Identity association.
#
# Invariants:
# - The operator reaches only buckets named <bucket_prefix>* and only KMS keys carrying the ShCR
#   tags; it can create keys only with the ShCR tags (aws:RequestTag), manage only keys tagged
#   shcr.dev/managed-by = shcr-operator (aws:ResourceTag), and cannot read or write records: it
#   has no object read/write, no kms:Decrypt or GenerateDataKey.
# - The gateway gets no AWS identity at all: it verifies tokens and forwards requests, and makes
#   no AWS call. A compromised gateway therefore holds no cloud credentials.
# - Stores get their access per care system from modules/care-system (one role per store,
#   scoped to its own bucket and key), never from this module.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_id  = data.aws_caller_identity.current.account_id
  partition   = data.aws_partition.current.partition
  region      = data.aws_region.current.name
  cluster_arn = "arn:${local.partition}:eks:${local.region}:${local.account_id}:cluster/${var.cluster_name}"
}

data "aws_iam_policy_document" "operator_trust" {
  statement {
    sid     = "EksPodIdentityForTheOperatorOnly"
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
      values   = [var.namespace]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/kubernetes-service-account"
      values   = [var.operator_service_account]
    }
  }
}

data "aws_iam_policy_document" "operator" {
  source_policy_documents = [
    templatefile("${path.module}/policies/operator.json.tftpl", {
      partition      = local.partition
      account_id     = local.account_id
      region         = local.region
      bucket_prefix  = var.bucket_prefix
      allow_deletion = var.allow_operator_deletion
    }),
  ]
}

resource "aws_iam_role" "operator" {
  name                 = var.iam_role_name
  path                 = var.iam_role_path
  description          = "ShCR operator: creates and manages ShCR buckets and KMS keys only"
  assume_role_policy   = data.aws_iam_policy_document.operator_trust.json
  permissions_boundary = var.iam_role_permissions_boundary
  tags                 = var.tags
}

resource "aws_iam_role_policy" "operator" {
  name   = "shcr-operator-buckets-and-keys"
  role   = aws_iam_role.operator.id
  policy = data.aws_iam_policy_document.operator.json
}

resource "aws_eks_pod_identity_association" "operator" {
  count = var.create_pod_identity_associations ? 1 : 0

  cluster_name    = var.cluster_name
  namespace       = var.namespace
  service_account = var.operator_service_account
  role_arn        = aws_iam_role.operator.arn
  tags            = var.tags
}
