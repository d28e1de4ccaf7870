# One bucket for everything t2v writes, and the least privilege to use it: the S3 actions that
# t2v/storage.py (boto3) and pyarrow (Ray Data, Ray Train checkpoints) call, on this bucket only.
# tests/test_cluster_configs.py derives that action set from the code and compares.

data "aws_caller_identity" "current" {}

resource "aws_s3_bucket" "data" {
  bucket = var.bucket_name
}

# Versioning: an overwritten package or a deleted checkpoint can be recovered for a while.
resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket     = aws_s3_bucket.data.id
  depends_on = [aws_s3_bucket_versioning.data]

  # Ray Train keeps the newest keep_checkpoints checkpoints and deletes older ones; with
  # versioning on, those deletions only hide them. This rule frees their bytes after a grace
  # period, and drops the delete markers left behind.
  rule {
    id     = "expire-old-checkpoints"
    status = "Enabled"
    filter {
      prefix = var.runs_prefix
    }
    noncurrent_version_expiration {
      noncurrent_days = var.old_checkpoint_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }

  # An upload killed midway (preempted worker) leaves invisible parts that are still billed.
  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 3
    }
  }
}

# The data policy: exactly what the jobs call, on exactly this bucket.
data "aws_iam_policy_document" "bucket_access" {
  statement {
    sid       = "ListAndHeadBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]
  }
  statement {
    sid = "ReadWriteObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
    ]
    resources = ["${aws_s3_bucket.data.arn}/*"]
  }
}

resource "aws_iam_policy" "bucket_access" {
  name        = "${var.name}-bucket-access"
  description = "t2v jobs: read/write objects of ${var.bucket_name} and list it, nothing else."
  policy      = data.aws_iam_policy_document.bucket_access.json
}

# Who may act as a t2v node: EC2 instances (cluster launcher), and optionally EKS pods (IRSA)
# and GCP VMs (Google web identity). All of them get short-lived credentials, never keys.
data "aws_iam_policy_document" "node_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = var.eks_oidc_provider_arn == "" ? [] : [var.eks_oidc_provider_arn]
    content {
      actions = ["sts:AssumeRoleWithWebIdentity"]
      principals {
        type        = "Federated"
        identifiers = [statement.value]
      }
      condition {
        test     = "StringEquals"
        variable = "${replace(statement.value, "/^.*oidc-provider\\//", "")}:sub"
        values   = ["system:serviceaccount:${var.eks_service_account}"]
      }
    }
  }

  dynamic "statement" {
    for_each = var.gcp_service_account_unique_id == "" ? [] : [var.gcp_service_account_unique_id]
    content {
      actions = ["sts:AssumeRoleWithWebIdentity"]
      principals {
        type        = "Federated"
        identifiers = ["accounts.google.com"]
      }
      condition {
        test     = "StringEquals"
        variable = "accounts.google.com:sub"
        values   = [statement.value]
      }
    }
  }
}

# Workers (and pods, and GCP VMs): the bucket, plus pulling the image from ECR.
resource "aws_iam_role" "node" {
  name               = "${var.name}-node"
  assume_role_policy = data.aws_iam_policy_document.node_trust.json
}

resource "aws_iam_role_policy_attachment" "node_bucket" {
  role       = aws_iam_role.node.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_role_policy_attachment" "node_ecr" {
  role       = aws_iam_role.node.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly"
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}

# The head: the same bucket access, plus what Ray's autoscaler needs to start and stop worker
# instances with the node profile. No S3 actions in this second policy.
data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "LaunchAndStopWorkers"
    actions = [
      "ec2:RunInstances",
      "ec2:TerminateInstances",
      "ec2:StartInstances",
      "ec2:StopInstances",
      "ec2:CreateTags",
      "ec2:DeleteTags",
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
    ]
    resources = ["*"]
  }
  statement {
    sid       = "HandWorkersTheNodeRole"
    actions   = ["iam:PassRole", "iam:GetInstanceProfile"]
    resources = [aws_iam_role.node.arn, aws_iam_instance_profile.node.arn]
  }
}

resource "aws_iam_policy" "autoscaler" {
  name        = "${var.name}-autoscaler"
  description = "t2v head: Ray autoscaler starts/stops workers that run as ${var.name}-node."
  policy      = data.aws_iam_policy_document.autoscaler.json
}

data "aws_iam_policy_document" "ec2_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "head" {
  name               = "${var.name}-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_role_policy_attachment" "head_bucket" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_role_policy_attachment" "head_autoscaler" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.autoscaler.arn
}

resource "aws_iam_role_policy_attachment" "head_ecr" {
  role       = aws_iam_role.head.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly"
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name}-head"
  role = aws_iam_role.head.name
}

# Where the images go (infra/docker): docker push to repository_url.
resource "aws_ecr_repository" "images" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
}
