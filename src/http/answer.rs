//! JSON answers whose size a client controls (the pending list, the activity feed): a client
//! that does not read keeps an answer's bytes in memory, ours and the connection's, until
//! RESPONSE_MIN_RATE cuts it, so large ones are counted like downloads.

use super::{error::ApiError, extract::WorkspaceClaim, AppState};
use crate::slots::{self, Slot};
use axum::{
    body::Body,
    http::header,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::StreamExt;

/// Answers up to this size go out as they are. Larger ones hold a download slot of the
/// workspace (`MAX_CONCURRENT_DOWNLOADS`, `..._PER_WORKSPACE`) until their body is dropped.
pub const SMALL_MAX: usize = 16 * 1024;

/// Pieces a large answer is handed to the connection in: the connection buffers up to 16 of
/// them (256 KiB) while the rest stays with the body, and with it the slot.
const PIECE: usize = 16 * 1024;

/// One of the workspace's download slots, or the refusal downloads get.
pub fn download_slot(st: &AppState, who: WorkspaceClaim) -> Result<Slot, ApiError> {
    st.download_slots
        .acquire(who.workspace_id, who.client)
        .map_err(|refused| match refused {
            slots::Refused::Replica => ApiError::DownloadCapacity,
            slots::Refused::Workspace => ApiError::WorkspaceDownloadsBusy,
            slots::Refused::Client => ApiError::ClientBusy,
        })
}

/// `value` as a 200 JSON answer, under a download slot when larger than [`SMALL_MAX`].
pub fn json<T: serde::Serialize>(
    st: &AppState,
    who: WorkspaceClaim,
    value: &T,
) -> Result<Response, ApiError> {
    let bytes = Bytes::from(serde_json::to_vec(value).map_err(ApiError::internal)?);
    if bytes.len() <= SMALL_MAX {
        return Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response());
    }
    let slot = download_slot(st, who)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(in_pieces(bytes, slot)),
    )
        .into_response())
}

/// `bytes` in [`PIECE`]s, holding `slot` until the last is taken (or the body dropped).
fn in_pieces(
    bytes: Bytes,
    slot: Slot,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    futures::stream::iter(pieces(bytes)).map(move |piece| {
        let _held = &slot;
        Ok(piece)
    })
}

/// `bytes` cut into [`PIECE`]s, each a copy of its own: a slice would keep the whole answer
/// alive for as long as the connection holds any piece of it, after the body (and its slot)
/// is gone.
pub fn pieces(bytes: Bytes) -> Vec<Bytes> {
    bytes.chunks(PIECE).map(Bytes::copy_from_slice).collect()
}
