//! S3 / MinIO / LocalStack storage: one object per file, keyed
//! `<prefix><workspace_id>/<file_id>` (file ids are random v4 UUIDs: unguessable).

use std::{io, time::Duration};

use async_trait::async_trait;
use aws_sdk_s3::{
    config::{RequestChecksumCalculation, ResponseChecksumValidation},
    error::{DisplayErrorContext, SdkError},
    primitives::{ByteStream, Length},
    Client,
};
use aws_smithy_types::timeout::TimeoutConfig;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use uuid::Uuid;

use super::{ByteRange, ByteStream as OurStream, Location, StorageBackend, StorageError};
use crate::{
    config::{S3Checksum, StorageArgs},
    spool::Spool,
};

/// S3's own maximum number of keys per ListObjectsV2 page.
pub const LIST_PAGE_MAX: i32 = 1000;

pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
}

/// An object under our prefix, as the orphan reconciliation sees it.
pub struct ListedObject {
    pub key: String,
    pub last_modified: Option<DateTime<Utc>>,
}

fn unavailable<E: std::error::Error + Send + Sync + 'static, R: std::fmt::Debug>(
    e: SdkError<E, R>,
) -> StorageError {
    StorageError::Unavailable(DisplayErrorContext(&e).to_string())
}

impl S3Backend {
    /// Builds the client from the standard AWS chain plus our settings; `None` when no bucket
    /// is configured.
    pub async fn from_args(args: &StorageArgs) -> Option<S3Backend> {
        let bucket = args.s3_bucket.clone().filter(|b| !b.is_empty())?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(endpoint) = &args.aws_endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = &args.aws_region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(args.s3_force_path_style)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        if shared.region().is_none() {
            conf = conf.region(aws_config::Region::new("us-east-1"));
        }
        if args.s3_checksum == S3Checksum::WhenRequired {
            conf = conf
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Some(S3Backend {
            client: Client::from_conf(conf.build()),
            bucket,
            prefix: args.s3_prefix.clone(),
        })
    }

    pub fn key_for(&self, workspace_id: Uuid, file_id: Uuid) -> String {
        format!("{}{}/{}", self.prefix, workspace_id, file_id)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The objects under our prefix, one listing page (at most `page_size` keys) at a time,
    /// so memory stays bounded however many objects the bucket holds.
    pub fn list_pages(
        &self,
        page_size: i32,
    ) -> impl Stream<Item = Result<Vec<ListedObject>, StorageError>> + Send + '_ {
        let pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .into_paginator()
            .page_size(page_size)
            .send();
        futures::stream::unfold(pages, |mut pages| async move {
            let page = pages.next().await?;
            Some((
                page.map(|p| listed(p.contents())).map_err(unavailable),
                pages,
            ))
        })
    }

    /// Every object under our prefix (tests and small buckets; the sweep pages instead).
    pub async fn list(&self) -> Result<Vec<ListedObject>, StorageError> {
        self.list_pages(LIST_PAGE_MAX).try_concat().await
    }

    pub async fn delete_key(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn put_key(&self, key: &str, spool: &Spool) -> Result<(), StorageError> {
        // The spool is an unnamed file; its /proc path lets the SDK reopen it with a fresh
        // offset on every retry, streaming 256 KiB at a time with a known length.
        let body = ByteStream::read_from()
            .path(spool.proc_path())
            .buffer_size(256 * 1024)
            .length(Length::Exact(spool.size))
            .build()
            .await
            .map_err(|e| StorageError::Io(io::Error::other(e)))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(spool.size as i64)
            .body(body)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn open(&self, key: &str, range: ByteRange) -> Result<ByteStream, StorageError> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end))
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(se) if se.is_no_such_key() => StorageError::Missing,
                _ => unavailable(e),
            })?;
        Ok(resp.body)
    }
}

/// One listing page as the reconciliation sees it: keys and their last-modified times.
fn listed(objects: &[aws_sdk_s3::types::Object]) -> Vec<ListedObject> {
    objects
        .iter()
        .filter_map(|obj| {
            let key = obj.key()?.to_string();
            let last_modified = obj
                .last_modified()
                .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()));
            Some(ListedObject { key, last_modified })
        })
        .collect()
}

/// An S3 body as a stream of chunks: the first chunk goes out before the last is read.
pub fn body_stream(body: ByteStream) -> OurStream {
    futures::stream::unfold(body, |mut body| async move {
        body.next()
            .await
            .map(|chunk| (chunk.map_err(io::Error::other), body))
    })
    .boxed()
}

#[async_trait]
impl StorageBackend for S3Backend {
    fn name(&self) -> &'static str {
        "s3"
    }

    async fn put(&self, loc: &Location, spool: &Spool) -> Result<Option<String>, StorageError> {
        let key = self.key_for(loc.workspace_id, loc.file_id);
        self.put_key(&key, spool).await?;
        Ok(Some(key))
    }

    async fn get(&self, loc: &Location, range: ByteRange) -> Result<OurStream, StorageError> {
        let key = loc.s3_key.as_deref().ok_or(StorageError::Missing)?;
        Ok(body_stream(self.open(key, range).await?))
    }

    async fn delete(&self, loc: &Location) -> Result<(), StorageError> {
        match loc.s3_key.as_deref() {
            Some(key) => self.delete_key(key).await,
            None => Ok(()),
        }
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
