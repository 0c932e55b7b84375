"""EKS: the IMDSv2 client, launch-template and Karpenter user-data, and the cluster-side
startup-taint remover."""
