variable "bucket_name" {
  description = "Globally unique S3 bucket for shards, runs, packages and renders."
  type        = string
}

variable "region" {
  description = "AWS region of the bucket and the cluster (provider.region in cluster/aws.yaml)."
  type        = string
  default     = "us-west-2"
}

variable "name" {
  description = "Prefix of the IAM role, policy and instance profile names."
  type        = string
  default     = "t2v"
}

variable "runs_prefix" {
  description = "Key prefix of training runs (the jobs' out=s3://BUCKET/runs): its old checkpoints expire."
  type        = string
  default     = "runs/"
}

variable "old_checkpoint_days" {
  description = "Days a replaced or deleted object under runs_prefix stays recoverable (noncurrent versions: checkpoints pruned by keep_checkpoints)."
  type        = number
  default     = 14
}

variable "eks_oidc_provider_arn" {
  description = "KubeRay on EKS: ARN of the cluster's IAM OIDC provider; empty = no IRSA trust."
  type        = string
  default     = ""
}

variable "eks_service_account" {
  description = "KubeRay on EKS: NAMESPACE:NAME of the ServiceAccount the pods run as."
  type        = string
  default     = "default:t2v"
}

variable "gcp_service_account_unique_id" {
  description = "Ray on GCP: numeric uniqueId of the VMs' service account (gcloud iam service-accounts describe); empty = no Google trust."
  type        = string
  default     = ""
}
