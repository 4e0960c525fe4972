//! Bearer authentication (SPEC §3): the admin token, and hashed per-workspace tokens.

use axum::http::{header, HeaderMap};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::{
    config::Secret,
    db::{self, Db, DbError},
};

/// Why a caller is refused (SPEC §3). The HTTP layer maps each to its status and text.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing workspace auth token")]
    Missing,
    #[error("invalid workspace auth token")]
    Invalid,
    #[error("invalid workspace ID")]
    BadWorkspaceId,
    /// The token lookup itself failed (database away: 503).
    #[error("token lookup failed: {0}")]
    Lookup(#[from] DbError),
}

/// A new workspace token (returned once), with what is stored of it.
pub struct NewToken {
    pub token: String,
    pub hash: [u8; 32],
    pub prefix: String,
}

/// 32 random bytes, base64url without padding: 43 characters.
pub fn new_token() -> NewToken {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = URL_SAFE_NO_PAD.encode(raw);
    NewToken {
        hash: hash_token(&token),
        prefix: token[..8].to_string(),
        token,
    }
}

/// A random shared secret for push delivery (same shape as a token).
pub fn new_secret() -> String {
    new_token().token
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The request's bearer: `None` when it sends none (no `Authorization`, another scheme, an
/// empty token); [`AuthError::Invalid`] for one whose bytes are not a token's (not visible
/// ASCII): a wrong bearer, as on the platform (Go compares its bytes), not a missing one.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let Some(space) = bytes.iter().position(|&b| b == b' ') else {
        return Ok(None);
    };
    let token = bytes[space + 1..].trim_ascii();
    if !bytes[..space].eq_ignore_ascii_case(b"bearer") || token.is_empty() {
        return Ok(None);
    }
    let visible = |b: &u8| b.is_ascii_graphic() || matches!(b, b' ' | b'\t');
    if !token.iter().all(visible) {
        return Err(AuthError::Invalid);
    }
    // Visible ASCII: always UTF-8.
    std::str::from_utf8(token)
        .map(Some)
        .map_err(|_| AuthError::Invalid)
}

#[derive(Clone)]
pub struct Auth {
    admin_token: Option<Secret>,
    db: Db,
}

/// Who is calling a workspace route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Workspace { token_id: Uuid },
}

/// What a bearer claims before the database has a say: the admin (checked here, it needs no
/// lookup), or a workspace token that the route's own query verifies (`db::tokens::CALLER`),
/// so the check costs no round trip of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Admin,
    Token { hash: [u8; 32] },
}

impl Credential {
    /// The token hash a query checks, `None` for the admin.
    pub fn token_hash(&self) -> Option<[u8; 32]> {
        match self {
            Credential::Admin => None,
            Credential::Token { hash } => Some(*hash),
        }
    }
}

impl Auth {
    pub fn new(admin_token: Option<Secret>, db: Db) -> Self {
        // An empty or blank ADMIN_TOKEN is as unset: fail closed.
        let admin_token = admin_token.filter(|s| !s.0.trim().is_empty());
        Auth { admin_token, db }
    }

    /// Compares digests, so the time taken tells nothing about the admin token's bytes or
    /// its length.
    pub fn is_admin(&self, token: &str) -> bool {
        match &self.admin_token {
            Some(admin) => bool::from(hash_token(&admin.0).ct_eq(&hash_token(token))),
            None => false,
        }
    }

    /// Admin-only routes.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let token = bearer(headers)?.ok_or(AuthError::Missing)?;
        if self.is_admin(token) {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }

    /// The bearer of a `/workspaces/:id/...` request and the id it claims, unverified for a
    /// workspace token.
    pub fn claim(
        &self,
        headers: &HeaderMap,
        raw_id: &str,
    ) -> Result<(Uuid, Credential), AuthError> {
        let token = bearer(headers)?.ok_or(AuthError::Missing)?;
        let id = parse_workspace_id(raw_id)?;
        let credential = if self.is_admin(token) {
            Credential::Admin
        } else {
            Credential::Token {
                hash: hash_token(token),
            }
        };
        Ok((id, credential))
    }

    /// `/workspaces/:id/...` routes: the admin, or a live token of that very workspace.
    pub async fn workspace(
        &self,
        headers: &HeaderMap,
        raw_id: &str,
    ) -> Result<(Uuid, Caller), AuthError> {
        let token = bearer(headers)?.ok_or(AuthError::Missing)?;
        let id = parse_workspace_id(raw_id)?;
        if self.is_admin(token) {
            return Ok((id, Caller::Admin));
        }
        let caller = self.token_for(token, id).await?;
        Ok((id, caller))
    }

    /// Checks that `token` is a live token of `workspace_id`.
    pub async fn token_for(&self, token: &str, workspace_id: Uuid) -> Result<Caller, AuthError> {
        let hash = hash_token(token);
        let found = self
            .db
            .run(move |c| Box::pin(async move { db::tokens::find_live(c, &hash).await }))
            .await?;
        match found {
            Some(t) if t.workspace_id == workspace_id => Ok(Caller::Workspace { token_id: t.id }),
            _ => Err(AuthError::Invalid),
        }
    }
}

pub fn parse_workspace_id(raw: &str) -> Result<Uuid, AuthError> {
    Uuid::parse_str(raw).map_err(|_| AuthError::BadWorkspaceId)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        let t = new_token();
        assert_eq!(t.token.len(), 43);
        assert!(t
            .token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(t.prefix, &t.token[..8]);
        assert_eq!(t.hash, hash_token(&t.token));
        assert_ne!(new_token().token, t.token);
    }

    #[tokio::test]
    async fn admin_token_matches_exactly_and_fails_closed() {
        // A lazy pool never connects: is_admin needs no database.
        let pool = || {
            let pool = sqlx::PgPool::connect_lazy("postgres://unused@127.0.0.1:1/x").unwrap();
            Db::new(pool, std::time::Duration::from_secs(1))
        };
        let auth = Auth::new(Some(Secret("s3cret-admin".into())), pool());
        assert!(auth.is_admin("s3cret-admin"));
        for wrong in [
            "",
            "s3cret",
            "s3cret-admin2",
            "S3CRET-ADMIN",
            " s3cret-admin",
        ] {
            assert!(!auth.is_admin(wrong), "{wrong:?}");
        }
        for unset in [None, Some(Secret(String::new()))] {
            let auth = Auth::new(unset, pool());
            assert!(!auth.is_admin(""));
            assert!(!auth.is_admin("anything"));
        }
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h).ok(), Some(None));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h).ok(), Some(Some("abc")));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h).ok(), Some(Some("abc")));
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h).ok(), Some(None));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h).ok(), Some(None));
        // Bytes that are not a token's: a wrong bearer (a white-box audit).
        let value = |b: &[u8]| header::HeaderValue::from_bytes(b).unwrap();
        h.insert(header::AUTHORIZATION, value(b"Bearer abc\xff"));
        assert!(matches!(bearer(&h), Err(AuthError::Invalid)));
        h.insert(header::AUTHORIZATION, value("Bearer abcé".as_bytes()));
        assert!(matches!(bearer(&h), Err(AuthError::Invalid)));
        h.insert(header::AUTHORIZATION, value(b"Basic abc\xff"));
        assert_eq!(bearer(&h).ok(), Some(None));
        h.insert(header::AUTHORIZATION, value(b"\xff"));
        assert_eq!(bearer(&h).ok(), Some(None));
    }
}
