"""The AWS EC2 provider: spot and on-demand GPU instances, EBS volumes, spot warnings."""

from adapters.aws.adapter import AwsAdapter

__all__ = ["AwsAdapter"]
