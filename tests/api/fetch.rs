use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::common::*;

fn content_path(ws: Uuid, fid: Uuid) -> String {
    format!("/workspaces/{ws}/pending-uploads/{fid}/content")
}

/// Whether `fid` gets its fetched_at stamp within 2 s (stamps are batched).
async fn stamped(app: &TestApp, fid: Uuid) -> bool {
    for _ in 0..200 {
        if fetched_at(app, fid).await.is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn fetched_at(app: &TestApp, fid: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT fetched_at FROM pending_uploads WHERE file_id = $1")
        .bind(fid)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn content_streams_bytes_with_the_specified_headers() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(3 * 1024 * 1024 + 123, 7); // spans several 1 MiB read chunks
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("My Report (final).pdf", "application/pdf", data.clone())],
        )
        .await;
    let fid = file_id(&out[0]);
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&data)));

    let head = app.send(Method::HEAD, &content_path(ws, fid), &token).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(head.headers()["etag"], etag.as_str());
    assert!(
        fetched_at(&app, fid).await.is_none(),
        "HEAD serves no bytes, stamps nothing"
    );

    let resp = app.get(&content_path(ws, fid), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/pdf");
    assert_eq!(h["content-length"], data.len().to_string().as_str());
    assert_eq!(
        h["content-disposition"],
        "attachment; filename=\"My_Report__final_.pdf\"; filename*=UTF-8''My_Report__final_.pdf"
    );
    assert_eq!(h["etag"], etag.as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    // the stored mimetype is the client's word: never let a browser sniff past it
    assert_eq!(h["x-content-type-options"], "nosniff");
    let body = resp.bytes().await.unwrap();
    assert!(body == data, "byte-identical");
    // stamped once the body has been handed over: a moment after the client has it all
    assert!(stamped(&app, fid).await, "serving stamps fetched_at");
    let list: Value = app
        .get(&format!("/workspaces/{ws}/pending-uploads"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert!(list[0]["fetched_at"].is_string());
}

#[tokio::test]
async fn a_file_without_mimetype_is_served_as_octet_stream() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let form = reqwest::multipart::Form::new().part(
        "files",
        reqwest::multipart::Part::bytes(b"raw".to_vec()).file_name("x"),
    );
    let resp = app
        .client
        .post(app.at(&format!("/workspaces/{ws}/chat/uploads")))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["files"][0]["mimeType"], "");
    let resp = app
        .get(&content_path(ws, file_id(&v["files"][0])), &token)
        .await;
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    // Rows the platform wrote with a type that is no media type are served the same way
    // (past ASCII: it went out as raw UTF-8 in Content-Type, a black-box probe); a media
    // type with its parameters is served as it is.
    for (stored, served) in [
        ("image/png; charset=é", "application/octet-stream"),
        ("garbage", "application/octet-stream"),
        ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
    ] {
        let fid: Uuid = sqlx::query_scalar(
            "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, mimetype)
             VALUES ($1, '\\x01', 1, 'p.png', $2) RETURNING file_id",
        )
        .bind(ws)
        .bind(stored)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let resp = app.get(&content_path(ws, fid), &token).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], served, "{stored}");
    }
}

/// A row another writer stored with a name that reorders or hides text is served under the
/// name as it shows: `invoice\u{202e}fdp.exe` kept its override in `filename*`, and a browser
/// saved it showing `invoiceexe.pdf` (a white-box audit). This service's uploads never
/// have such names (SPEC §5 keeps ASCII only).
#[tokio::test]
async fn a_stored_name_that_hides_text_is_served_as_it_shows() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let fid: Uuid = sqlx::query_scalar(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, mimetype)
         VALUES ($1, '\\x01', 1, $2, 'application/octet-stream') RETURNING file_id",
    )
    .bind(ws)
    .bind("invoice\u{202e}fdp\u{2066}.exe")
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let resp = app.get(&content_path(ws, fid), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"invoicefdp.exe\"; filename*=UTF-8''invoicefdp.exe"
    );
}

/// RFC 9110 §13.1.1: If-Match was ignored, so a client asking for the bytes only if they are
/// still the ones it knows got them whatever they were. Now a GET or HEAD whose If-Match
/// names no current entity-tag, strongly compared, is 412 with no bytes; `*` holds for any
/// file there is; a weak tag never matches.
#[tokio::test]
async fn if_match_names_the_bytes_or_the_answer_is_412() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let fid = file_id(
        &app.upload_ok(
            ws,
            &token,
            &[("m.bin", "application/octet-stream", b"abc".to_vec())],
        )
        .await[0],
    );
    let path = content_path(ws, fid);
    let etag = app.get(&path, &token).await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    let ask = |method: reqwest::Method, if_match: String, also: Option<(&'static str, String)>| {
        let (app, token, path) = (&app, &token, &path);
        async move {
            let mut req = app
                .client
                .request(method, app.at(path))
                .bearer_auth(token)
                .header("If-Match", if_match);
            if let Some((name, value)) = also {
                req = req.header(name, value);
            }
            req.send().await.unwrap()
        }
    };
    for held in [etag.clone(), format!("\"x\", {etag}"), "*".to_string()] {
        let resp = ask(reqwest::Method::GET, held.clone(), None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{held}");
        assert_eq!(resp.bytes().await.unwrap(), &b"abc"[..]);
        let resp = ask(reqwest::Method::HEAD, held.clone(), None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{held}");
        assert_eq!(resp.headers()["content-length"], "3");
    }
    // RFC 9110 §13.2.2: a failed If-Match answers before If-None-Match (here a 304) and
    // before a Range (a 206).
    let others = [
        None,
        Some(("If-None-Match", etag.clone())),
        Some(("Range", "bytes=0-0".to_string())),
    ];
    for failed in ["\"x\"".to_string(), format!("W/{etag}")] {
        for also in others.clone() {
            let resp = ask(reqwest::Method::GET, failed.clone(), also.clone()).await;
            assert_error(
                resp,
                StatusCode::PRECONDITION_FAILED,
                "precondition failed: If-Match names no current ETag",
            )
            .await;
            let resp = ask(reqwest::Method::HEAD, failed.clone(), also).await;
            assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED, "{failed}");
        }
    }
    // A row without a digest has a weak ETag: only * holds for it, never the tag itself.
    sqlx::query("UPDATE pending_uploads SET content_sha256 = NULL WHERE file_id = $1")
        .bind(fid)
        .execute(&app.pool)
        .await
        .unwrap();
    let weak = app.get(&path, &token).await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(weak.starts_with("W/"), "{weak}");
    let resp = ask(reqwest::Method::GET, "*".to_string(), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = ask(reqwest::Method::GET, weak.clone(), None).await;
    assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED, "{weak}");
}

#[tokio::test]
async fn ranges() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(2 * 1024 * 1024 + 10, 3);
    let n = data.len();
    let fid = file_id(
        &app.upload_ok(
            ws,
            &token,
            &[("r.bin", "application/octet-stream", data.clone())],
        )
        .await[0],
    );
    let path = content_path(ws, fid);
    let cases: Vec<(String, usize, usize)> = vec![
        ("bytes=0-0".into(), 0, 0),
        ("bytes=10-19".into(), 10, 19),
        ("bytes=-5".into(), n - 5, n - 1),
        (format!("bytes={}-", n - 100), n - 100, n - 1),
        // across the 1 MiB read-chunk boundary
        ("bytes=1048570-1048590".into(), 1_048_570, 1_048_590),
        (format!("bytes=5-{}", n * 2), 5, n - 1),
    ];
    for (range, start, end) in cases {
        let resp = app
            .client
            .get(app.at(&path))
            .bearer_auth(&token)
            .header("Range", &range)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{end}/{n}").as_str(),
            "{range}"
        );
        assert_eq!(
            resp.headers()["content-length"],
            (end - start + 1).to_string().as_str()
        );
        let body = resp.bytes().await.unwrap();
        assert!(body == data[start..=end], "{range}: bytes");
    }
    for range in [
        format!("bytes={n}-"),
        format!("bytes={}-{}", n + 1, n + 5),
        "bytes=-0".into(),
    ] {
        let resp = app
            .client
            .get(app.at(&path))
            .bearer_auth(&token)
            .header("Range", &range)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes */{n}").as_str()
        );
        assert_error(
            resp,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "requested range not satisfiable",
        )
        .await;
    }
    // multi-range and malformed ranges are ignored: the whole file
    for range in ["bytes=0-1,5-6", "bytes=x-y", "lines=1-2"] {
        let resp = app
            .client
            .get(app.at(&path))
            .bearer_auth(&token)
            .header("Range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{range}");
        assert_eq!(resp.bytes().await.unwrap().len(), n);
    }
    // Range is a singleton field (as If-Range is): sent twice, neither is served, however
    // each reads alone (the first was served).
    for second in ["bytes=5-6", "bytes=0-1"] {
        let resp = app
            .client
            .get(app.at(&path))
            .bearer_auth(&token)
            .header("Range", "bytes=0-1")
            .header("Range", second)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "Range twice, then {second}");
        assert!(resp.headers().get("content-range").is_none());
        assert_eq!(resp.bytes().await.unwrap().len(), n);
    }
    // HEAD honours Range too
    let resp = app
        .client
        .head(app.at(&path))
        .bearer_auth(&token)
        .header("Range", "bytes=1-2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-length"], "2");
}

/// A workspace holding `data` twice: as this service stores it (a strong ETag, the sha256) and
/// as the platform or an older binary writes it (no digest, a weak ETag).
struct Tagged {
    app: TestApp,
    ws: Uuid,
    token: String,
    fid: Uuid,
    weak_fid: Uuid,
    strong: String,
    weak: String,
    /// A strong tag of other bytes: names neither file.
    other: String,
}

async fn tagged(data: &[u8]) -> Tagged {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[
                ("s.bin", "application/octet-stream", data.to_vec()),
                ("w.bin", "application/octet-stream", data.to_vec()),
            ],
        )
        .await;
    let (fid, weak_fid) = (file_id(&out[0]), file_id(&out[1]));
    sqlx::query("UPDATE pending_uploads SET content_sha256 = NULL WHERE file_id = $1")
        .bind(weak_fid)
        .execute(&app.pool)
        .await
        .unwrap();
    Tagged {
        app,
        ws,
        token,
        fid,
        weak_fid,
        strong: format!("\"{}\"", hex::encode(Sha256::digest(data))),
        weak: format!("W/\"{weak_fid}\""),
        other: format!("\"{}\"", hex::encode(Sha256::digest(b"other"))),
    }
}

/// RFC 9110 §13.1.5: a Range sent with If-Range is served only while the If-Range validator
/// is the current strong ETag (strong comparison); otherwise the whole file, as if no Range
/// had been sent. A weak tag never matches, nor a date (no Last-Modified is sent). If-Range
/// without Range changes nothing. HEAD answers the headers GET would.
/// SPEC §4: fetched_at is stamped once the body has been handed over. A range that stops
/// short of the last byte hands over part of it: a one-byte probe (`bytes=0-0`) stamped the
/// file, and the pending list said it was fetched. A range that reaches the end (a download
/// resumed to its end) stamps.
#[tokio::test]
async fn only_a_range_that_reaches_the_last_byte_stamps_fetched_at() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(100_000, 9);
    let out = app
        .upload_ok(
            ws,
            &token,
            &[
                ("probed.bin", "application/octet-stream", data.clone()),
                ("control.bin", "application/octet-stream", data.clone()),
            ],
        )
        .await;
    let (probed, control) = (file_id(&out[0]), file_id(&out[1]));
    let ranged = |fid: Uuid, range: &'static str| {
        app.client
            .get(app.at(&content_path(ws, fid)))
            .bearer_auth(&token)
            .header("Range", range)
            .send()
    };
    for range in ["bytes=0-0", "bytes=10-99998"] {
        let resp = ranged(probed, range).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        resp.bytes().await.unwrap();
    }
    // Downloaded after the probes: once its stamp is written, theirs would be too.
    let resp = app.get(&content_path(ws, control), &token).await;
    assert!(resp.bytes().await.unwrap() == data);
    assert!(stamped(&app, control).await);
    assert!(
        fetched_at(&app, probed).await.is_none(),
        "ranges short of the last byte hand over part of the body"
    );
    let list: Value = app
        .get(&format!("/workspaces/{ws}/pending-uploads"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["file_id"], probed.to_string());
    assert_eq!(list[0]["fetched_at"], Value::Null);
    // The rest, resumed to the end: handed over.
    let resp = ranged(probed, "bytes=99999-").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.bytes().await.unwrap(), data[99_999..]);
    assert!(stamped(&app, probed).await, "a range to the end stamps");
}

#[tokio::test]
async fn if_range_serves_the_range_only_for_the_current_strong_etag() {
    let data = bytes(1000, 9);
    let Tagged {
        app,
        ws,
        token,
        fid,
        weak_fid,
        strong,
        weak,
        other,
    } = tagged(&data).await;
    let weakened = format!("W/{strong}");
    let n = data.len();
    let (range, past_end) = (Some("bytes=10-19"), Some("bytes=2000-"));
    let (ok, partial, unsatisfiable) = (
        StatusCode::OK,
        StatusCode::PARTIAL_CONTENT,
        StatusCode::RANGE_NOT_SATISFIABLE,
    );
    let tens = Some((10, 19));
    type Case<'a> = (
        Uuid,
        Option<&'a str>,
        Option<&'a str>,
        StatusCode,
        Option<(usize, usize)>,
    );
    let cases: Vec<Case> = vec![
        (fid, range, Some(&strong), partial, tens),
        (fid, range, Some(&other), ok, None),
        (fid, range, Some("W/\"abc\""), ok, None),
        (fid, range, Some(&weakened), ok, None),
        (fid, range, Some("Wed, 21 Oct 2015 07:28:00 GMT"), ok, None),
        (fid, range, Some("not a validator"), ok, None),
        (weak_fid, range, Some(&weak), ok, None),
        (weak_fid, range, None, partial, tens),
        (fid, None, Some(&strong), ok, None),
        (fid, None, Some(&other), ok, None),
        (fid, past_end, Some(&strong), unsatisfiable, None),
        (fid, past_end, Some(&other), ok, None),
    ];
    for (file, range, if_range, status, part) in cases {
        let case = format!("{file} Range {range:?} If-Range {if_range:?}");
        for method in [Method::GET, Method::HEAD] {
            let mut req = app
                .client
                .request(method.clone(), app.at(&content_path(ws, file)))
                .bearer_auth(&token);
            if let Some(v) = range {
                req = req.header("Range", v);
            }
            if let Some(v) = if_range {
                req = req.header("If-Range", v);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), status, "{method} {case}");
            if status == unsatisfiable {
                continue;
            }
            let h = resp.headers().clone();
            let (start, end) = part.unwrap_or((0, n - 1));
            let tag = if file == fid { &strong } else { &weak };
            assert_eq!(h["etag"], tag.as_str(), "{method} {case}");
            assert_eq!(h["accept-ranges"], "bytes", "{method} {case}");
            assert_eq!(
                h["content-length"],
                (end - start + 1).to_string().as_str(),
                "{method} {case}"
            );
            assert_eq!(
                h.get("content-range")
                    .map(|v| v.to_str().unwrap().to_string()),
                part.map(|(a, b)| format!("bytes {a}-{b}/{n}")),
                "{method} {case}"
            );
            if method == Method::GET {
                let body = resp.bytes().await.unwrap();
                assert!(body == data[start..=end], "{method} {case}: bytes");
            }
        }
    }
}

/// RFC 9110 §13.1.2: a browser revalidating its cached copy sends the ETag it holds in
/// If-None-Match and gets 304 with the ETag and no bytes while that is current (weak
/// comparison; `*` names any); anything else gets the file. If-None-Match is evaluated before
/// Range; a missing file is still 404; a 304 hands over no bytes, so it stamps no fetched_at.
#[tokio::test]
async fn if_none_match_answers_304_while_the_etag_is_current() {
    let data = bytes(300_000, 4);
    let Tagged {
        app,
        ws,
        token,
        fid,
        weak_fid,
        strong,
        weak,
        other,
    } = tagged(&data).await;
    let (not_modified, ok, partial) = (
        StatusCode::NOT_MODIFIED,
        StatusCode::OK,
        StatusCode::PARTIAL_CONTENT,
    );
    let cases: Vec<(Uuid, Option<&str>, String, StatusCode)> = vec![
        (fid, None, strong.clone(), not_modified),
        (fid, None, format!("W/{strong}"), not_modified),
        (
            fid,
            None,
            format!("{other}, \"x,y\" ,{strong}"),
            not_modified,
        ),
        (fid, None, "*".into(), not_modified),
        (fid, Some("bytes=0-9"), strong.clone(), not_modified),
        (weak_fid, None, weak.clone(), not_modified),
        (
            weak_fid,
            None,
            weak.trim_start_matches("W/").into(),
            not_modified,
        ),
        (fid, None, other.clone(), ok),
        (fid, None, strong.to_uppercase(), ok),
        (fid, None, format!("junk {strong}"), ok),
        (fid, Some("bytes=0-9"), other.clone(), partial),
    ];
    for (file, range, if_none_match, status) in cases {
        let case = format!("{file} Range {range:?} If-None-Match {if_none_match}");
        for method in [Method::GET, Method::HEAD] {
            let mut req = app
                .client
                .request(method.clone(), app.at(&content_path(ws, file)))
                .bearer_auth(&token)
                .header("If-None-Match", &if_none_match);
            if let Some(v) = range {
                req = req.header("Range", v);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), status, "{method} {case}");
            let tag = if file == fid { &strong } else { &weak };
            assert_eq!(resp.headers()["etag"], tag.as_str(), "{method} {case}");
            if status == not_modified {
                // RFC 9110 §8.6: none, or the 200's; a HEAD said 0 where its GET said none.
                for framing in ["content-length", "transfer-encoding"] {
                    assert_eq!(resp.headers().get(framing), None, "{method} {case}");
                }
            }
            let body = resp.bytes().await.unwrap();
            match (status, &method) {
                (StatusCode::OK, &Method::GET) => assert!(body == data, "{case}: the file"),
                (StatusCode::PARTIAL_CONTENT, &Method::GET) => assert!(body == data[..10]),
                _ => assert!(body.is_empty(), "{method} {case}: no bytes"),
            }
        }
    }
    let pair = app
        .upload_ok(
            ws,
            &token,
            &[
                ("r.bin", "text/plain", b"cached".to_vec()),
                ("c.bin", "text/plain", b"control".to_vec()),
            ],
        )
        .await;
    let (revalidated_only, control) = (file_id(&pair[0]), file_id(&pair[1]));
    let tag = format!("\"{}\"", hex::encode(Sha256::digest(b"cached")));
    let resp = app
        .client
        .get(app.at(&content_path(ws, revalidated_only)))
        .bearer_auth(&token)
        .header("If-None-Match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), not_modified);
    let resp = app
        .client
        .get(app.at(&content_path(ws, Uuid::new_v4())))
        .bearer_auth(&token)
        .header("If-None-Match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "no representation, no 304"
    );
    // A download after the 304: once its stamp is written, a stamp of the 304 would be too.
    let resp = app
        .client
        .get(app.at(&content_path(ws, control)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap(), &b"control"[..]);
    assert!(stamped(&app, control).await);
    assert!(
        fetched_at(&app, revalidated_only).await.is_none(),
        "a 304 hands over no bytes"
    );
}

#[tokio::test]
async fn missing_expired_and_foreign_files_are_the_same_404() {
    let app = TestApp::start().await;
    let (a, a_token) = app.poll_workspace().await;
    let (b, b_token) = app.poll_workspace().await;
    let a_file = file_id(
        &app.upload_ok(
            a,
            &a_token,
            &[("a.txt", "text/plain", b"secret of a".to_vec())],
        )
        .await[0],
    );
    let expired = file_id(
        &app.upload_ok(a, &a_token, &[("old.txt", "text/plain", b"old".to_vec())])
            .await[0],
    );
    sqlx::query(
        "UPDATE pending_uploads SET expires_at = now() - interval '1 second' WHERE file_id = $1",
    )
    .bind(expired)
    .execute(&app.pool)
    .await
    .unwrap();
    let not_found = json!({"error": "pending upload not found or expired"});
    for (ws, token, fid) in [
        (a, a_token.as_str(), Uuid::new_v4()), // missing
        (a, a_token.as_str(), expired),        // expired
        (b, b_token.as_str(), a_file),         // B asking for A's file under its own id
        (b, ADMIN, a_file),                    // even the admin, under the wrong workspace
    ] {
        assert_json(
            app.get(&content_path(ws, fid), token).await,
            StatusCode::NOT_FOUND,
            not_found.clone(),
        )
        .await;
        let head = app.send(Method::HEAD, &content_path(ws, fid), token).await;
        assert_eq!(head.status(), StatusCode::NOT_FOUND);
        assert_json(
            app.post(
                &format!("/workspaces/{ws}/pending-uploads/{fid}/ack"),
                token,
            )
            .await,
            StatusCode::NOT_FOUND,
            not_found.clone(),
        )
        .await;
    }
    // B's token on A's path, then bad UUIDs: the status and text SPEC gives each
    let cases = [
        (
            false,
            content_path(a, a_file),
            b_token.as_str(),
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        ),
        (
            false,
            format!("/workspaces/{a}/pending-uploads/nope/content"),
            a_token.as_str(),
            StatusCode::BAD_REQUEST,
            "invalid file_id",
        ),
        (
            false,
            format!("/workspaces/nope/pending-uploads/{a_file}/content"),
            ADMIN,
            StatusCode::BAD_REQUEST,
            "invalid workspace ID",
        ),
        (
            true,
            format!("/workspaces/{a}/pending-uploads/nope/ack"),
            a_token.as_str(),
            StatusCode::BAD_REQUEST,
            "invalid file_id",
        ),
    ];
    for (is_post, path, bearer, status, error) in cases {
        let resp = if is_post {
            app.post(&path, bearer).await
        } else {
            app.get(&path, bearer).await
        };
        assert_json(resp, status, json!({ "error": error })).await;
    }
    // A's bytes were never touched by any of that
    assert!(fetched_at(&app, a_file).await.is_none());
    let b_list: Value = app
        .get(&format!("/workspaces/{b}/pending-uploads"), &b_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b_list, json!([]));
}

#[tokio::test]
async fn list_ack_and_reading_after_ack() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[
                ("1.txt", "text/plain", b"one".to_vec()),
                ("2.txt", "text/plain", b"two".to_vec()),
            ],
        )
        .await;
    let list: Value = app
        .get(&format!("/workspaces/{ws}/pending-uploads"), &token)
        .await
        .json()
        .await
        .unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let mut keys: Vec<&str> = list[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "created_at",
            "expires_at",
            "fetched_at",
            "file_id",
            "mimeType",
            "name",
            "size",
            "uri"
        ]
    );
    assert_eq!(list[0]["uri"], out[0]["uri"]);
    assert_eq!(list[0]["fetched_at"], Value::Null);

    let fid = file_id(&out[0]);
    let ack = format!("/workspaces/{ws}/pending-uploads/{fid}/ack");
    assert_json(
        app.post(&ack, &token).await,
        StatusCode::OK,
        json!({"acked": true}),
    )
    .await;
    let first: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT acked_at FROM pending_uploads WHERE file_id = $1")
            .bind(fid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_json(
        app.post(&ack, &token).await,
        StatusCode::OK,
        json!({"acked": true}),
    )
    .await;
    let second: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT acked_at FROM pending_uploads WHERE file_id = $1")
            .bind(fid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(first, second, "idempotent: the first stamp stays");
    let list: Value = app
        .get(&format!("/workspaces/{ws}/pending-uploads"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "acked rows leave the list"
    );
    // an acked row stays readable until swept (canvas previews)
    let resp = app.get(&content_path(ws, fid), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"one");
}

async fn pending_names(app: &TestApp, ws: Uuid, token: &str) -> Vec<String> {
    let resp = app
        .get(&format!("/workspaces/{ws}/pending-uploads"), token)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// The list is streamed a page (200 rows) at a time: every row once, in order, across page
/// boundaries that fall inside a run of equal created_at.
#[tokio::test]
async fn a_long_list_streams_every_row_once_in_order() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    assert!(pending_names(&app, ws, &token).await.is_empty());
    // one statement: one created_at for all; every 7th acked, every 11th expired
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, acked_at, expires_at)
         SELECT $1, '\\x01', 1, lpad(g::text, 5, '0'),
                CASE WHEN g % 7 = 0 THEN now() END,
                CASE WHEN g % 11 = 0 THEN now() - interval '1 second' ELSE now() + interval '1 hour' END
         FROM generate_series(1, 2600) g ORDER BY g",
    )
    .bind(ws)
    .execute(&app.pool)
    .await
    .unwrap();
    let expected: Vec<String> = (1..=2600)
        .filter(|g| g % 7 != 0 && g % 11 != 0)
        .map(|g| format!("{g:05}"))
        .collect();
    assert!(expected.len() > 2000);
    assert_eq!(pending_names(&app, ws, &token).await, expected);
    // exactly one full page, then none
    sqlx::query("DELETE FROM pending_uploads WHERE workspace_id = $1 AND filename > $2")
        .bind(ws)
        .bind(&expected[999])
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(pending_names(&app, ws, &token).await, expected[..1000]);
}

/// Each page of a long list reads its own rows, not the workspace's from the first. Once the
/// statement's plan went generic (a connection's sixth run) each page read from the first row,
/// and rows expired but not yet swept were read and dropped: these 2,000 (among 4,000 expired,
/// and 40,000 of other workspaces, on an analyzed table) read 50,000 rows before
/// 20261206200000_pending_list_index, 6,000 with its first version (expired rows read), 2,000
/// now.
#[tokio::test]
async fn each_page_of_a_long_list_reads_only_its_rows() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let rows = 2000;
    // 4,000 expired first, then the live ones
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, expires_at)
         SELECT $1, '\\x01', 1, lpad(g::text, 5, '0'),
                now() + CASE WHEN g <= 4000 THEN interval '-1 second' ELSE interval '1 hour' END
         FROM generate_series(1, 4000 + $2) g ORDER BY g",
    )
    .bind(ws)
    .bind(rows)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename)
         SELECT ('00000000-0000-4000-8000-' || lpad((g / 20)::text, 12, '0'))::uuid, '\\x01', 1, 'f'
         FROM generate_series(1, 40000) g",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    analyze(&app.pool, "pending_uploads").await;
    let read = rows_read(&app.db_url, "pending_uploads").await;
    assert_eq!(pending_names(&app, ws, &token).await.len(), rows as usize);
    let read = rows_read(&app.db_url, "pending_uploads").await - read;
    assert!(
        read <= 2 * i64::from(rows),
        "{read} rows read for a list of {rows}"
    );
}

#[tokio::test]
async fn ack_that_loses_the_race_with_the_sweeper_is_raced() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let fid = file_id(
        &app.upload_ok(ws, &token, &[("r.txt", "text/plain", b"race".to_vec())])
            .await[0],
    );
    // The "sweeper" deletes the row but has not committed yet: the ack sees the row, then
    // blocks on its lock, then finds it gone.
    let mut sweeper_tx = app.pool.begin().await.unwrap();
    sqlx::query("DELETE FROM pending_uploads WHERE file_id = $1")
        .bind(fid)
        .execute(&mut *sweeper_tx)
        .await
        .unwrap();
    let ack = {
        let req = app
            .client
            .post(app.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/ack")))
            .bearer_auth(&token);
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    let mut waiting = false;
    for _ in 0..1000 {
        waiting = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%pending_uploads%')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        waiting,
        "the ack reached its UPDATE and waits on the sweeper's lock"
    );
    sweeper_tx.commit().await.unwrap();
    assert_json(
        ack.await.unwrap(),
        StatusCode::OK,
        json!({"acked": true, "raced": true}),
    )
    .await;
}

/// Two acks of one file at once: the one that waited on the row lock finds the file acked by
/// the other, alive. That is a second ack (200 `{"acked":true}`), not a race lost to the
/// sweeper (`raced` means the row is gone).
#[tokio::test]
async fn ack_that_waits_on_a_concurrent_ack_is_a_repeat() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let fid = file_id(
        &app.upload_ok(ws, &token, &[("r.txt", "text/plain", b"race".to_vec())])
            .await[0],
    );
    // The other ack has stamped the row but not committed yet.
    let mut other_tx = app.pool.begin().await.unwrap();
    sqlx::query("UPDATE pending_uploads SET acked_at = now() WHERE file_id = $1")
        .bind(fid)
        .execute(&mut *other_tx)
        .await
        .unwrap();
    let ack = {
        let req = app
            .client
            .post(app.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/ack")))
            .bearer_auth(&token);
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    let mut waiting = false;
    for _ in 0..1000 {
        waiting = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%pending_uploads%')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        waiting,
        "the ack reached its UPDATE and waits on the other's lock"
    );
    other_tx.commit().await.unwrap();
    assert_json(ack.await.unwrap(), StatusCode::OK, json!({"acked": true})).await;
    // Still alive, acked once, and served.
    let resp = app.get(&content_path(ws, fid), &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"race");
}

#[tokio::test]
async fn twenty_megabytes_round_trip() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(20 * 1024 * 1024, 11);
    let fid = file_id(
        &app.upload_ok(
            ws,
            &token,
            &[("big.bin", "application/octet-stream", data.clone())],
        )
        .await[0],
    );
    let got = app
        .get(&content_path(ws, fid), &token)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
}

/// Rows spooled on disk go in with an INSERT up to INSERT_MAX_BYTES and with a COPY above it;
/// rows held in memory (the default for this request's size) always with an INSERT, one
/// statement for the whole upload. Every path byte-exact.
#[tokio::test]
async fn sizes_around_the_insert_copy_boundary_round_trip() {
    for spool_memory in ["0", "16777216"] {
        let app = TestApp::start_with(&["--spool-memory-per-request", spool_memory]).await;
        sizes_round_trip(&app).await;
    }
}

async fn sizes_round_trip(app: &TestApp) {
    let (ws, token) = app.poll_workspace().await;
    let edge = pending_uploads::db::uploads::INSERT_MAX_BYTES as usize;
    let sizes = [1, edge - 1, edge, edge + 1, 3 * edge + 7];
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("f{n}.bin"), bytes(n, i as u8 + 40)))
        .collect();
    let parts: Vec<(&str, &str, Vec<u8>)> = octet_parts(&files);
    let out = app.upload_ok(ws, &token, &parts).await;
    for (entry, (_, data)) in out.iter().zip(&files) {
        let fid = file_id(entry);
        let (stored, digest): (Vec<u8>, Vec<u8>) = sqlx::query_as(
            "SELECT content, content_sha256 FROM pending_uploads WHERE file_id = $1",
        )
        .bind(fid)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert!(stored == *data, "{} bytes stored exactly", data.len());
        assert_eq!(digest, Sha256::digest(data).to_vec());
        let resp = app.get(&content_path(ws, fid), &token).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.bytes().await.unwrap() == data[..],
            "{} bytes served",
            data.len()
        );
    }
}

/// A file of up to WHOLE_UP_TO bytes comes whole with its row (one statement for the whole
/// download), in pieces of WHOLE_PIECE; a larger one brings its first slice of READ_CHUNK
/// only, and the rest follows in slices.
#[tokio::test]
async fn a_small_file_is_read_whole_with_its_row() {
    use futures::StreamExt;
    use pending_uploads::{
        auth::hash_token,
        db::{
            uploads::{Head, Live},
            Checked,
        },
        storage::bytea::{READ_CHUNK, WHOLE_PIECE, WHOLE_UP_TO},
    };
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let whole_up_to = WHOLE_UP_TO as usize;
    let files = vec![
        ("whole.bin".to_string(), bytes(whole_up_to, 1)),
        ("larger.bin".to_string(), bytes(whole_up_to + 1, 2)),
    ];
    let out = app.upload_ok(ws, &token, &octet_parts(&files)).await;
    let mut conn = app.pool.acquire().await.unwrap();
    for (entry, (_, data)) in out.iter().zip(&files) {
        let head = Head {
            len: READ_CHUNK,
            whole_up_to: Some(WHOLE_UP_TO),
            piece: WHOLE_PIECE,
        };
        let mut found = None;
        let (rest_tx, rest) = futures::channel::mpsc::unbounded();
        pending_uploads::db::uploads::get_live_for(
            &mut conn,
            ws,
            Some(hash_token(&token)),
            file_id(entry),
            Some(head),
            |f| found = Some(f),
            rest_tx,
        )
        .await
        .unwrap();
        let Some(Checked::Allowed(Some(Live {
            head: Some(head),
            whole,
            ..
        }))) = found
        else {
            panic!("no head for {} bytes", data.len());
        };
        assert_eq!(whole, data.len() <= whole_up_to, "{} bytes", data.len());
        let pieces: Vec<_> = rest.map(Result::unwrap).collect().await;
        let read: Vec<u8> = [&head[..]]
            .into_iter()
            .chain(pieces.iter().map(|p| &p[..]))
            .flatten()
            .copied()
            .collect();
        let (expected, in_pieces) = if data.len() <= whole_up_to {
            (data.len(), WHOLE_UP_TO.div_ceil(WHOLE_PIECE) as usize)
        } else {
            (READ_CHUNK as usize, 1)
        };
        assert_eq!(pieces.len() + 1, in_pieces, "{} bytes", data.len());
        assert!(
            read == data[..expected],
            "{} bytes: head of {expected}",
            data.len()
        );
    }
}

/// A download stamps its token's last_used_at when the stamp is over a minute old, as every
/// route does: after the file's rows, since a stamp in the download's own statement (a
/// data-modifying CTE) made PostgreSQL read every piece of the file before it sent the first.
#[tokio::test]
async fn a_download_stamps_its_token_after_its_bytes() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(600 << 10, 3);
    let out = app
        .upload_ok(
            ws,
            &token,
            &octet_parts(&[("f.bin".to_string(), data.clone())]),
        )
        .await;
    let path = content_path(ws, file_id(&out[0]));
    let stamp_age = || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT extract(epoch FROM now() - last_used_at)::float8
             FROM workspace_auth_tokens WHERE workspace_id = $1",
        )
        .bind(ws)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    for age in ["10 seconds", "2 minutes"] {
        sqlx::query(&format!(
            "UPDATE workspace_auth_tokens SET last_used_at = now() - interval '{age}'
             WHERE workspace_id = $1"
        ))
        .bind(ws)
        .execute(&app.pool)
        .await
        .unwrap();
        let resp = app.get(&path, &token).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.unwrap() == data[..]);
        if age == "10 seconds" {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = stamp_age().await;
            assert!(
                now >= 10.0,
                "a 10 s old stamp is left alone (now {now} s old)"
            );
        } else {
            eventually(
                "a 2 min old stamp is renewed",
                Duration::from_secs(5),
                || async { stamp_age().await < 10.0 },
            )
            .await;
        }
    }
}

/// Statements PostgreSQL executes (counted on the wire by a proxy in front of it) for a
/// download of a 1 MiB file with `serve` flags `extra`, up to its batched fetched_at stamp;
/// then for a Range GET of all but its first byte (the stamp again included, as far as it
/// went out within 300 ms). The first GET sends `If-Match: <if_match>` when given.
async fn statements_per_download(extra: &[&str], if_match: Option<&str>) -> (u64, u64) {
    use pending_uploads::storage::bytea::WHOLE_UP_TO;
    let db = fresh_db().await;
    let (upstream, via) = crate::wire::split_host(&db);
    let proxy = crate::wire::Proxy::start(upstream).await;
    // The long-poll listener's heartbeat (a statement every two DEPENDENCY_TIMEOUTs) must not
    // fall in a counted window.
    let extra = [extra, &["--dependency-timeout", "60s"]].concat();
    let app = TestApp::start_on(via(proxy.port), &extra).await;
    let direct = sqlx::PgPool::connect(&db).await.unwrap();
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(WHOLE_UP_TO as usize, 5);
    let files = vec![("whole.bin".to_string(), data.clone())];
    let fid = file_id(&app.upload_ok(ws, &token, &octet_parts(&files)).await[0]);
    // The upload's long-poll announcement goes out batched, after its answer.
    let before = settled(&proxy).await;
    let mut get = app
        .client
        .get(app.at(&content_path(ws, fid)))
        .bearer_auth(&token);
    if let Some(held) = if_match {
        get = get.header("If-Match", held);
    }
    let resp = get.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap() == data[..]);
    let mut stamped = false;
    for _ in 0..200 {
        let at: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT fetched_at FROM pending_uploads WHERE file_id = $1")
                .bind(fid)
                .fetch_one(&direct)
                .await
                .unwrap();
        if at.is_some() {
            stamped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stamped, "the download was stamped");
    let whole = proxy.counts().since(&before).get(b'E');

    let before = settled(&proxy).await;
    let resp = app
        .client
        .get(app.at(&content_path(ws, fid)))
        .bearer_auth(&token)
        .header("Range", format!("bytes=1-{}", WHOLE_UP_TO - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert!(resp.bytes().await.unwrap() == data[1..]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    (whole, proxy.counts().since(&before).get(b'E'))
}

/// The proxy's counts once no statement has gone through it for 300 ms.
async fn settled(proxy: &crate::wire::Proxy) -> crate::wire::Counts {
    let mut before = proxy.counts();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = proxy.counts();
        let sent = now.since(&before);
        if sent.get(b'E') + sent.get(b'Q') == 0 {
            return now;
        }
        before = now;
    }
    panic!("statements kept going through the proxy for 15 s");
}

/// A download of a file of up to WHOLE_UP_TO is one statement: the caller check, the row and
/// every byte (then its stamp). Read in slices, it was four; a range of that size is one
/// statement after the row's.
#[tokio::test]
async fn a_small_file_downloads_in_one_statement() {
    let (whole, range) = statements_per_download(&[], None).await;
    assert_eq!(whole, 2, "the row with its bytes, then the stamp");
    assert!(
        range <= 3,
        "{range} statements: the row, the range, the stamp"
    );
}

/// A download asked with If-Match most likely gets its bytes (its client names the file it
/// knows), so they come with the row as without it: it was read in slices (5 statements).
#[tokio::test]
async fn a_download_asked_if_match_reads_its_bytes_with_the_row() {
    let (whole, _) = statements_per_download(&[], Some("*")).await;
    assert_eq!(whole, 2, "the row with its bytes, then the stamp");
}

/// DOWNLOAD_READ_AHEAD_BYTES bounds whole reads; 0 turns them off, and a 1 MiB file is read
/// in its four slices.
#[tokio::test]
async fn without_read_ahead_a_small_file_is_read_in_slices() {
    let (whole, range) = statements_per_download(&["--download-read-ahead-bytes", "0"], None).await;
    assert_eq!(
        whole, 5,
        "the row with its first slice, three slices, the stamp"
    );
    assert!(range >= 5, "{range} statements: the row and four slices");
}

/// Downloads of sizes around the slice and whole-read edges, more at once than the read-ahead
/// budget holds whole reads (the rest are read in slices): every one byte-exact, and the
/// budget is whole again once they are done.
#[tokio::test]
async fn downloads_past_the_whole_read_budget_are_served_in_slices() {
    use pending_uploads::storage::bytea::{READ_CHUNK, WHOLE_UP_TO};
    let app = TestApp::start_with(&["--max-concurrent-downloads-per-workspace", "64"]).await;
    let budget = app.storage.read_ahead_budget();
    let full = budget.available_permits();
    let (ws, token) = app.poll_workspace().await;
    let (slice, whole) = (READ_CHUNK as usize, WHOLE_UP_TO as usize);
    let sizes = [slice - 1, slice, slice + 1, whole - 1, whole, whole + 1];
    let files: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            let n = sizes[i % sizes.len()];
            (format!("f{i}.bin"), bytes(n, i as u8))
        })
        .collect();
    let mut ids = Vec::new();
    for batch in files.chunks(6) {
        let out = app.upload_ok(ws, &token, &octet_parts(batch)).await;
        ids.extend(out.iter().map(file_id));
    }
    let downloads = ids.iter().zip(&files).map(|(&fid, (_, data))| {
        let (app, token) = (&app, &token);
        async move {
            let resp = app.get(&content_path(ws, fid), token).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let served = resp.bytes().await.unwrap();
            assert!(served == data[..], "{} bytes served exactly", data.len());
        }
    });
    futures::future::join_all(downloads).await;
    // A body is dropped (and its room given back) just after its last byte went out.
    for _ in 0..200 {
        if budget.available_permits() == full {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("read-ahead budget {} of {full}", budget.available_permits());
}

/// Downloads every file at once, each read to its end.
async fn download_all_at_once(app: &TestApp, ws: Uuid, token: &str, files: &[Uuid]) {
    let downloads = files.iter().map(|&fid| async move {
        let resp = app.get(&content_path(ws, fid), token).await;
        assert_eq!(resp.status(), StatusCode::OK);
        resp.bytes().await.unwrap();
    });
    futures::future::join_all(downloads).await;
}

/// Downloads handed over together are stamped together (one UPDATE per batch, see
/// `fetched`): every file fetched gets its fetched_at, and no other row does.
#[tokio::test]
async fn concurrent_downloads_are_all_stamped_and_only_they() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let mut files = Vec::new();
    for i in 0..24u8 {
        let out = app
            .upload_ok(
                ws,
                &token,
                &[("f.bin", "application/octet-stream", bytes(100, i))],
            )
            .await;
        files.push(file_id(&out[0]));
    }
    let (fetched, untouched) = files.split_at(16);
    download_all_at_once(&app, ws, &token, fetched).await;
    let mut stamped: Vec<Uuid> = Vec::new();
    for _ in 0..200 {
        stamped = sqlx::query_scalar(
            "SELECT file_id FROM pending_uploads WHERE fetched_at IS NOT NULL ORDER BY file_id",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        if stamped.len() >= fetched.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut want = fetched.to_vec();
    want.sort();
    assert_eq!(
        stamped, want,
        "every download stamped, once the bodies were handed over"
    );
    for fid in untouched {
        assert!(fetched_at(&app, *fid).await.is_none());
    }
}

#[tokio::test]
async fn past_batch_max_keys_further_stamps_are_dropped() {
    // The stamp writer is held up by a lock on the rows while every download finishes: with
    // one key kept, the batch in flight and the one queued behind it are all that can be
    // stamped. Timing cannot make this pass: without the cap all 48 are stamped.
    let app = TestApp::start_with(&[
        "--batch-max-keys",
        "1",
        "--max-concurrent-downloads-per-workspace",
        "64",
    ])
    .await;
    let (ws, token) = app.poll_workspace().await;
    let parts: Vec<(String, Vec<u8>)> = (0..48u8)
        .map(|i| (format!("f{i}.bin"), bytes(100, i)))
        .collect();
    let out = app.upload_ok(ws, &token, &octet_parts(&parts)).await;
    let files: Vec<Uuid> = out.iter().map(file_id).collect();
    let mut hold = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pending_uploads WHERE workspace_id = $1 FOR UPDATE")
        .bind(ws)
        .execute(&mut *hold)
        .await
        .unwrap();
    download_all_at_once(&app, ws, &token, &files).await;
    hold.commit().await.unwrap();
    // Let the batches that could still come, come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stamped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE fetched_at IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        (1..=2).contains(&stamped),
        "{stamped} of 48 stamped: one batch was in flight and one key kept behind it"
    );
}
