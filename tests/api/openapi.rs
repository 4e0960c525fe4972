use reqwest::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn the_served_document_is_the_committed_one_and_covers_every_route() {
    let app = TestApp::start().await;
    let resp = app
        .client
        .get(app.at("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let served = resp.text().await.unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/openapi.json"))
            .unwrap();
    assert!(
        served == committed,
        "deploy/openapi.json is stale: run `cargo run -q -- openapi > deploy/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/uploads/limits", "get"),
        ("/registry/register", "post"),
        ("/workspaces", "post"),
        ("/workspaces/{id}", "get"),
        ("/workspaces/{id}", "delete"),
        ("/workspaces/{id}/tokens", "post"),
        ("/workspaces/{id}/tokens/{token_id}", "delete"),
        ("/workspaces/{id}/chat/uploads", "post"),
        ("/workspaces/{id}/activity", "get"),
        ("/workspaces/{id}/pending-uploads", "get"),
        ("/workspaces/{id}/pending-uploads/{file_id}/content", "get"),
        ("/workspaces/{id}/pending-uploads/{file_id}/content", "head"),
        ("/workspaces/{id}/pending-uploads/{file_id}/ack", "post"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} is documented"
        );
    }
}

#[tokio::test]
async fn a_route_outside_the_document_is_a_json_404() {
    let app = TestApp::start().await;
    for path in ["/nope", "/workspaces/x/y/z", "/uploads"] {
        assert_error(
            app.get(path, ADMIN).await,
            StatusCode::NOT_FOUND,
            "not found",
        )
        .await;
    }
}

/// Every answer shares the one rendered document: each was a copy of its own (51 KB), which a
/// connection that asked and did not read held (3,000 of them took 200 MiB, a resource probe).
#[test]
fn the_document_is_shared_not_copied_per_answer() {
    let (a, b) = (
        pending_uploads::http::document(),
        pending_uploads::http::document(),
    );
    assert!(a.len() > 10_000);
    assert_eq!(a.as_ptr(), b.as_ptr());
}
