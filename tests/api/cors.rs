use reqwest::{Method, StatusCode};

use crate::common::*;

const CANVAS: &str = "https://canvas.example.com";

/// An origin listed the way people write URLs (capitals, a default port, a trailing slash)
/// is the origin a browser sends: it matched nothing before (the layer compares bytes), and
/// the canvas got no CORS headers at all.
#[tokio::test]
async fn a_listed_origin_is_matched_as_browsers_write_it() {
    let app = TestApp::start_with(&[
        "--cors-allowed-origins",
        "https://Canvas.Example.COM:443/, ,",
    ])
    .await;
    let resp = app
        .client
        .get(app.at("/uploads/limits"))
        .header("Origin", CANVAS)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["access-control-allow-origin"], CANVAS);
}

#[tokio::test]
async fn listed_origins_get_preflight_answers_and_cors_headers() {
    let app = TestApp::start_with(&[
        "--cors-allowed-origins",
        &format!("{CANVAS},https://other.example"),
    ])
    .await;
    let (ws, token) = app.poll_workspace().await;
    let preflight = app
        .client
        .request(
            Method::OPTIONS,
            app.at(&format!("/workspaces/{ws}/chat/uploads")),
        )
        .header("Origin", CANVAS)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], CANVAS);
    assert_eq!(h["x-content-type-options"], "nosniff");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    // The conditional headers a download takes may be sent from the canvas: If-Match too.
    let preflight = app
        .client
        .request(
            Method::OPTIONS,
            app.at(&format!("/workspaces/{ws}/pending-uploads/x/content")),
        )
        .header("Origin", CANVAS)
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "if-match,range")
        .send()
        .await
        .unwrap();
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    let allowed: Vec<&str> = allowed.split(',').map(str::trim).collect();
    for h in ["if-match", "if-none-match", "if-range", "range"] {
        assert!(allowed.contains(&h), "{h}: {allowed:?}");
    }

    let fid = file_id(
        &app.upload_ok(ws, &token, &[("a.txt", "text/plain", b"hi".to_vec())])
            .await[0],
    );
    let resp = app
        .client
        .get(app.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/content")))
        .bearer_auth(&token)
        .header("Origin", CANVAS)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["access-control-allow-origin"], CANVAS);
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in [
        "content-disposition",
        "content-length",
        "content-range",
        "etag",
    ] {
        assert!(exposed.contains(h), "{h} exposed: {exposed}");
    }

    // A framework's rejection (here 405) is JSON and keeps its CORS headers: a browser reads
    // it instead of a network error.
    let resp = app
        .client
        .put(app.at("/uploads/limits"))
        .header("Origin", CANVAS)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["access-control-allow-origin"], CANVAS);
    assert_eq!(resp.headers()["content-type"], "application/json");

    // an origin not on the list gets nothing
    let resp = app
        .client
        .get(app.at("/uploads/limits"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn without_configured_origins_there_are_no_cors_headers() {
    let app = TestApp::start().await;
    let resp = app
        .client
        .get(app.at("/uploads/limits"))
        .header("Origin", CANVAS)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}
