use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

async fn register(app: &TestApp, body: Value, bearer: Option<&str>) -> reqwest::Response {
    let mut req = app.client.post(app.at("/registry/register")).json(&body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap()
}

/// A bearer whose bytes are not text is a wrong bearer, as on the platform (SPEC §3: 401
/// `invalid workspace auth token`), not a missing one (a white-box audit); another scheme
/// is still no bearer.
#[tokio::test]
async fn a_bearer_that_is_not_text_is_a_wrong_one() {
    let app = TestApp::start().await;
    let (id, token) = app.poll_workspace().await;
    let value = |bytes: Vec<u8>| reqwest::header::HeaderValue::from_bytes(&bytes).unwrap();
    let not_text = value([format!("Bearer {token}").as_bytes(), b"\xff"].concat());
    let feed = app.at(&format!("/workspaces/{id}/activity"));
    for (auth, error) in [
        (not_text.clone(), "invalid workspace auth token"),
        (
            value(b"Basic abc\xff".to_vec()),
            "missing workspace auth token",
        ),
    ] {
        let resp = app
            .client
            .get(&feed)
            .header("Authorization", auth.clone())
            .send()
            .await
            .unwrap();
        assert_error(resp, StatusCode::UNAUTHORIZED, error).await;
    }
    let resp = app
        .client
        .post(app.at("/registry/register"))
        .header("Authorization", not_text)
        .json(&json!({"id": id}))
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "invalid workspace auth token",
    )
    .await;
}

#[tokio::test]
async fn first_registration_issues_a_token_and_reregistration_needs_it() {
    let app = TestApp::start().await;
    let id = Uuid::new_v4();
    let resp = register(
        &app,
        json!({"id": id, "agent_card": {"name": "laptop"}}),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "registered");
    assert_eq!(v["id"], json!(id));
    assert_eq!(v["delivery_mode"], "poll", "no url: poll");
    let token = v["auth_token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 43);
    // stored hashed, never in clear
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT token_hash FROM workspace_auth_tokens WHERE workspace_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 32);
    assert_ne!(stored, token.as_bytes());

    assert_error(
        register(&app, json!({"id": id}), None).await,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    assert_error(
        register(&app, json!({"id": id}), Some("not-the-token")).await,
        StatusCode::UNAUTHORIZED,
        "invalid workspace auth token",
    )
    .await;
    // another workspace's live token is just as wrong
    let (_, other_token) = app.poll_workspace().await;
    assert_eq!(
        register(&app, json!({"id": id}), Some(&other_token))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );

    let resp = register(
        &app,
        json!({"id": id, "url": "http://127.0.0.1:9"}),
        Some(&token),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let secret = v["platform_inbound_secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 43);
    assert_eq!(
        v,
        json!({"status": "registered", "id": id, "delivery_mode": "poll", "platform_inbound_secret": secret}),
        "mode kept, no new token, the inbound secret on every registration"
    );
    let resp = register(
        &app,
        json!({"id": id, "delivery_mode": "push"}),
        Some(ADMIN),
    )
    .await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["delivery_mode"], "push");
    assert!(v.get("auth_token").is_none());
    let ws: Value = app
        .get(&format!("/workspaces/{id}"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ws["url"], "http://127.0.0.1:9");
    assert_eq!(ws["name"], "laptop");
}

#[tokio::test]
async fn registration_defaults_and_validation() {
    let app = TestApp::start().await;
    let id = Uuid::new_v4();
    let v: Value = register(&app, json!({"id": id, "url": "http://127.0.0.1:9"}), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["delivery_mode"], "push", "url given: push");
    assert!(v["platform_inbound_secret"].as_str().unwrap().len() >= 43);

    assert_error(
        register(
            &app,
            json!({"id": Uuid::new_v4(), "delivery_mode": "carrier-pigeon"}),
            None,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "delivery_mode must be 'push' or 'poll'",
    )
    .await;
    let resp = register(&app, json!({"id": "nope"}), None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // a push URL the proxy could never call is refused up front, on both routes
    for bad in [
        "\u{a0}\u{fe}+",
        "127.0.0.1:9",
        "ftp://host/x",
        "http://",
        "/relative",
        // no authority (RFC 3986), though a WHATWG parser reads host `x` into them
        "http:///x",
        "http:x",
        "http://exa\nmple.com/",
        // empty userinfo, translated and local-use NAT64 forms, reserved ranges: accepted
        // before (a black-box probe)
        "http://@example.com/",
        "http://:@example.com/",
        "http://[::ffff:0:a9fe:a9fe]/",
        "http://[64:ff9b:1::a9fe:a9fe]/",
        "http://198.18.0.1/",
        "http://192.0.2.1/",
        "http://[2001:db8::1]/",
        "http://[100::1]/",
    ] {
        assert_error(
            register(&app, json!({"id": Uuid::new_v4(), "url": bad}), None).await,
            StatusCode::BAD_REQUEST,
            "workspace URL not allowed",
        )
        .await;
        let resp = app
            .client
            .post(app.at("/workspaces"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "x", "url": bad}))
            .send()
            .await
            .unwrap();
        assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    }
    // Postgres text cannot hold NUL: a clear 400, not a 500
    assert_error(
        register(
            &app,
            json!({"id": Uuid::new_v4(), "agent_card": {"name": "a\u{0}b"}}),
            None,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "strings must not contain NUL characters",
    )
    .await;
    assert_eq!(
        app.count("workspaces").await,
        1,
        "invalid registrations store nothing"
    );
}

#[tokio::test]
async fn a_removed_workspace_cannot_be_reclaimed_by_registering_it() {
    let app = TestApp::start().await;
    let (id, own) = app.poll_workspace().await;
    let (_, other) = app.poll_workspace().await;
    let resp = app.delete(&format!("/workspaces/{id}"), ADMIN).await;
    assert_json(resp, StatusCode::OK, json!({"status": "removed", "id": id})).await;
    // SPEC §4: re-registering an existing workspace without its own live token or the
    // admin's is 401, removed or not; only the admin is told it was removed.
    assert_error(
        register(&app, json!({"id": id}), None).await,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    for token in [own.as_str(), other.as_str(), "garbage"] {
        assert_error(
            register(&app, json!({"id": id}), Some(token)).await,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        )
        .await;
    }
    assert_error(
        register(&app, json!({"id": id}), Some(ADMIN)).await,
        StatusCode::CONFLICT,
        "workspace has been removed",
    )
    .await;
}

#[tokio::test]
async fn create_workspace_is_admin_only() {
    let app = TestApp::start().await;
    let (_, ws_token) = app.poll_workspace().await;
    let body = json!({"name": "x"});
    let resp = app
        .client
        .post(app.at("/workspaces"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    for bad in ["wrong", ws_token.as_str()] {
        let resp = app
            .client
            .post(app.at("/workspaces"))
            .bearer_auth(bad)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(
            resp,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        )
        .await;
    }
    let id = Uuid::new_v4();
    let resp = app
        .client
        .post(app.at("/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": id, "name": "pushy", "url": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], json!(id));
    assert_eq!(v["delivery_mode"], "push");
    assert_eq!(v["status"], "registered");
    assert_eq!(v["auth_token"].as_str().unwrap().len(), 43);
    let resp = app
        .client
        .post(app.at("/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": id, "name": "again"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::CONFLICT, "workspace already exists").await;
    let resp = app
        .client
        .post(app.at("/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "name is required").await;
}

#[tokio::test]
async fn without_admin_token_there_is_no_admin_access() {
    let app = TestApp::start_with(&["--admin-token", ""]).await;
    for bearer in ["", "x", ADMIN] {
        let resp = app
            .client
            .post(app.at("/workspaces"))
            .bearer_auth(bearer)
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "bearer {bearer:?}");
    }
    let resp = app
        .get(&format!("/workspaces/{}", Uuid::new_v4()), ADMIN)
        .await;
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "invalid workspace auth token",
    )
    .await;
}

#[tokio::test]
async fn auth_matrix_on_a_workspace_route() {
    let app = TestApp::start().await;
    let (a, a_token) = app.poll_workspace().await;
    let (_, b_token) = app.poll_workspace().await;
    let path = format!("/workspaces/{a}");

    let resp = app.client.get(app.at(&path)).send().await.unwrap();
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    let resp = app
        .client
        .get(app.at(&path))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    for bad in ["garbage", b_token.as_str()] {
        assert_error(
            app.get(&path, bad).await,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        )
        .await;
    }
    for good in [a_token.as_str(), ADMIN] {
        let resp = app.get(&path, good).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let v: Value = resp.json().await.unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            ["created_at", "delivery_mode", "id", "name", "status", "url"]
        );
        assert_eq!(v["status"], "online");
    }
    assert_error(
        app.get("/workspaces/not-a-uuid", ADMIN).await,
        StatusCode::BAD_REQUEST,
        "invalid workspace ID",
    )
    .await;
    assert_error(
        app.get(&format!("/workspaces/{}", Uuid::new_v4()), ADMIN)
            .await,
        StatusCode::NOT_FOUND,
        "workspace not found",
    )
    .await;
    let used: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT last_used_at FROM workspace_auth_tokens WHERE workspace_id = $1",
    )
    .bind(a)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(used.is_some(), "last_used_at stamped");

    // Stamped at most once a minute: a fresh stamp stays, an old one moves.
    let stamp_then_use = |age: &'static str| {
        let app = &app;
        let path = &path;
        let token = a_token.clone();
        async move {
            sqlx::query(&format!(
                "UPDATE workspace_auth_tokens SET last_used_at = now() - interval '{age}' WHERE workspace_id = $1"
            ))
            .bind(a)
            .execute(&app.pool)
            .await
            .unwrap();
            assert_eq!(app.get(path, &token).await.status(), StatusCode::OK);
            sqlx::query_scalar::<_, f64>(
                "SELECT extract(epoch FROM now() - last_used_at)::float8 FROM workspace_auth_tokens WHERE workspace_id = $1",
            )
            .bind(a)
            .fetch_one(&app.pool)
            .await
            .unwrap()
        }
    };
    let age = stamp_then_use("10 seconds").await;
    assert!(
        age >= 10.0,
        "a 10 s old stamp is left alone (now {age} s old)"
    );
    let age = stamp_then_use("2 minutes").await;
    assert!(age < 10.0, "a 2 min old stamp is renewed (now {age} s old)");
}

#[tokio::test]
async fn removing_a_workspace_revokes_its_tokens_but_keeps_its_uploads() {
    let app = TestApp::start().await;
    let (id, token) = app.poll_workspace().await;
    app.upload_ok(id, &token, &[("a.txt", "text/plain", b"hello".to_vec())])
        .await;
    let del = |bearer: String| {
        let req = app
            .client
            .delete(app.at(&format!("/workspaces/{id}")))
            .bearer_auth(bearer);
        async move { req.send().await.unwrap() }
    };
    assert_eq!(
        del(token.clone()).await.status(),
        StatusCode::UNAUTHORIZED,
        "a workspace cannot delete itself"
    );
    assert_eq!(del(ADMIN.into()).await.status(), StatusCode::OK);
    assert_error(
        app.get(&format!("/workspaces/{id}"), &token).await,
        StatusCode::UNAUTHORIZED,
        "invalid workspace auth token",
    )
    .await;
    let v: Value = app
        .get(&format!("/workspaces/{id}"), ADMIN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "removed");
    assert_eq!(
        app.count("pending_uploads").await,
        1,
        "rows stay until their TTL"
    );
    // uploads to a removed workspace: not found
    assert_error(
        app.upload(id, ADMIN, &[("b.txt", "text/plain", b"x".to_vec())])
            .await,
        StatusCode::NOT_FOUND,
        "workspace not found",
    )
    .await;
    let resp = app
        .delete(&format!("/workspaces/{}", Uuid::new_v4()), ADMIN)
        .await;
    assert_error(resp, StatusCode::NOT_FOUND, "workspace not found").await;
    // Bytes that are not UTF-8 too (axum's own 400 `bad request` before; a white-box audit).
    for bad in ["/workspaces/xyz", "/workspaces/%FF"] {
        let resp = app.delete(bad, ADMIN).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "invalid workspace ID").await;
    }
}

#[tokio::test]
async fn token_rotation() {
    let app = TestApp::start().await;
    let (id, old) = app.poll_workspace().await;
    let (other, other_token) = app.poll_workspace().await;
    let resp = app.post(&format!("/workspaces/{id}/tokens"), &old).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let new = v["auth_token"].as_str().unwrap().to_string();
    assert_eq!(v["prefix"], &new[..8]);
    let new_id = v["id"].as_str().unwrap().to_string();
    let old_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM workspace_auth_tokens WHERE workspace_id = $1 AND prefix = $2",
    )
    .bind(id)
    .bind(&old[..8])
    .fetch_one(&app.pool)
    .await
    .unwrap();

    // a workspace cannot revoke another's token, nor name a token that is not its own
    let resp = app
        .delete(
            &format!("/workspaces/{other}/tokens/{old_id}"),
            &other_token,
        )
        .await;
    assert_error(resp, StatusCode::NOT_FOUND, "token not found").await;
    let resp = app
        .delete(&format!("/workspaces/{id}/tokens/{old_id}"), &other_token)
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = app
        .delete(&format!("/workspaces/{id}/tokens/bad"), &new)
        .await;
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid token ID").await;

    let resp = app
        .delete(&format!("/workspaces/{id}/tokens/{old_id}"), &new)
        .await;
    assert_json(resp, StatusCode::OK, json!({"revoked": true})).await;
    assert_eq!(
        app.get(&format!("/workspaces/{id}"), &old).await.status(),
        StatusCode::UNAUTHORIZED,
        "revoked"
    );
    assert_eq!(
        app.get(&format!("/workspaces/{id}"), &new).await.status(),
        StatusCode::OK,
        "others stay valid"
    );
    // revoking again is harmless
    let resp = app
        .delete(&format!("/workspaces/{id}/tokens/{old_id}"), &new)
        .await;
    assert_json(resp, StatusCode::OK, json!({"revoked": true})).await;
    assert_ne!(new_id, old_id.to_string());
}

#[tokio::test]
async fn an_unreachable_datastore_during_auth_is_503() {
    let app = TestApp::start().await;
    let (id, token) = app.poll_workspace().await;
    // Cut the service off its database: no new connections, existing ones terminated.
    let closed = ClosedDatabase::close(&app.db_url).await;
    // The first request may meet a terminated pooled connection; by the third the pool has
    // none left and opens new ones, which the closed database refuses (FATAL 55000).
    for _ in 0..3 {
        let resp = app
            .get(&format!("/workspaces/{id}/pending-uploads"), &token)
            .await;
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            Some("5"),
            "{}",
            resp.status()
        );
        assert_json(
            resp,
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "platform datastore unavailable — retry shortly", "code": "platform_unavailable"}),
        )
        .await;
    }
    let resp = app.client.get(app.at("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers()["retry-after"],
        "5",
        "every 503 says when to retry"
    );
    assert_eq!(
        app.client
            .get(app.at("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    drop(closed);
    // and it recovers on its own
    let mut ok = false;
    for _ in 0..50 {
        if app
            .get(&format!("/workspaces/{id}/pending-uploads"), &token)
            .await
            .status()
            == StatusCode::OK
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "service recovers when the database is back");
}

/// Workspaces are never deleted and the first registration needs no credential: a name or
/// URL could carry a whole 64 KiB body into a row for good. Names are at most 256
/// characters, push URLs 2048 bytes; longer is a 400 and writes nothing.
#[tokio::test]
async fn names_and_urls_are_bounded() {
    let app = TestApp::start().await;
    let long = "n".repeat(257);
    let resp = register(
        &app,
        json!({"id": Uuid::new_v4(), "agent_card": {"name": long}}),
        None,
    )
    .await;
    assert_error(
        resp,
        StatusCode::BAD_REQUEST,
        "name must be at most 256 characters",
    )
    .await;
    let resp = app
        .client
        .post(app.at("/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": long}))
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::BAD_REQUEST,
        "name must be at most 256 characters",
    )
    .await;
    let url = format!("https://example.com/{}", "u".repeat(2029));
    assert_eq!(url.len(), 2049);
    let resp = register(&app, json!({"id": Uuid::new_v4(), "url": url}), None).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    assert_eq!(app.count("workspaces").await, 0, "nothing written");
    let fits = "é".repeat(256);
    let resp = register(
        &app,
        json!({"id": Uuid::new_v4(), "agent_card": {"name": fits}}),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "256 characters (512 bytes)");
}

/// A re-registration with the workspace's own token is not counted against the replica's
/// REGISTRATIONS_PER_MINUTE, but one whose push URL names a host costs a name lookup (a place
/// of MAX_CONCURRENT_REGISTRATION_LOOKUPS until the resolver answers): those count against the
/// client's own REGISTRATIONS_PER_MINUTE_PER_CLIENT, so one client re-registering in a loop
/// with slow names cannot take every lookup place. An address needs no lookup, and the admin
/// is never counted.
#[tokio::test]
async fn reregistrations_that_look_up_a_name_count_against_the_client() {
    let app = TestApp::start_with(&["--registrations-per-minute-per-client", "2"]).await;
    let id = Uuid::new_v4();
    let resp = register(&app, json!({"id": id, "delivery_mode": "poll"}), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let token = resp.json::<Value>().await.unwrap()["auth_token"]
        .as_str()
        .unwrap()
        .to_string();
    for url in [None, Some("http://93.184.216.34:9/hook")] {
        for _ in 0..3 {
            let resp = register(&app, json!({"id": id, "url": url}), Some(&token)).await;
            assert_eq!(
                resp.status(),
                StatusCode::OK,
                "no lookup ({url:?}): not counted"
            );
        }
    }
    // A name in a reserved domain: the lookup fails at once and the URL is taken (the
    // connect-time check still applies).
    let named = json!({"id": id, "url": "http://push.example.invalid/hook"});
    let resp = register(&app, named.clone(), Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::OK, "the client's second place");
    let resp = register(&app, named.clone(), Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "30");
    let resp = register(&app, named, Some(ADMIN)).await;
    assert_eq!(resp.status(), StatusCode::OK, "the admin is not counted");
}
