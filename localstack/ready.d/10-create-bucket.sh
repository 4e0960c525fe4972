#!/usr/bin/env bash
# Init hook for the official LocalStack image (mounted at /etc/localstack/init/ready.d):
# creates the pending-uploads bucket once S3 is ready. Used by deploy/docker-compose.yml.
set -euo pipefail
awslocal s3 mb "s3://${PENDING_UPLOADS_S3_BUCKET:-pending-uploads}" || true
