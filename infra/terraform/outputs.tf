# The values cluster/aws.yaml, cluster/gcp.yaml and cluster/kuberay/ need (cluster/README.md
# shows the sed line that writes them into a copy of each).

output "bucket_name" {
  description = "Use as s3://BUCKET/... in every job argument."
  value       = aws_s3_bucket.data.id
}

output "region" {
  description = "provider.region of cluster/aws.yaml; AWS_DEFAULT_REGION elsewhere."
  value       = var.region
}

output "account_id" {
  description = "Replaces the placeholder account 123456789012 in cluster/."
  value       = data.aws_caller_identity.current.account_id
}

output "head_instance_profile_arn" {
  description = "cluster/aws.yaml: available_node_types.head.node_config.IamInstanceProfile.Arn."
  value       = aws_iam_instance_profile.head.arn
}

output "node_instance_profile_arn" {
  description = "cluster/aws.yaml: IamInstanceProfile.Arn of every worker type."
  value       = aws_iam_instance_profile.node.arn
}

output "node_role_arn" {
  description = "KubeRay ServiceAccount annotation (IRSA) and AWS_ROLE_ARN on GCP nodes."
  value       = aws_iam_role.node.arn
}

output "image_repository" {
  description = "docker push target for infra/docker images (tags 0.1.0-cuda, 0.1.0-cpu)."
  value       = aws_ecr_repository.images.repository_url
}
