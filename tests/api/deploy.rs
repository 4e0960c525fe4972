//! The deploy files stay consistent with the binary: every environment variable they set is
//! one it reads, every metric the dashboard and alerts query is one it exports.

use std::{collections::BTreeSet, path::Path};

use pending_uploads::{cli::env_vars, metrics::metrics};
use serde_yaml::Value as Yaml;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<Yaml> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn keys(v: &Yaml) -> Vec<String> {
    v.as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_environment_variable_in_deploy_files_is_read_by_the_binary() {
    let known = env_vars();
    assert!(
        known.contains("DATABASE_URL")
            && known.contains("PENDING_UPLOADS_BACKEND")
            && known.contains("AWS_ENDPOINT_URL")
    );
    let mut set: Vec<(String, String)> = Vec::new();

    let compose = &yaml_docs("deploy/docker-compose.yml")[0];
    for k in keys(&compose["services"]["pending-uploads"]["environment"]) {
        set.push(("docker-compose.yml".into(), k));
    }
    for k in keys(&yaml_docs("deploy/k8s/configmap.yaml")[0]["data"]) {
        set.push(("configmap.yaml".into(), k));
    }
    for k in keys(&yaml_docs("deploy/k8s/secret.example.yaml")[0]["stringData"]) {
        set.push(("secret.example.yaml".into(), k));
    }
    let deployment = &yaml_docs("deploy/k8s/deployment.yaml")[0];
    for container in deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
    {
        for env in container["env"].as_sequence().into_iter().flatten() {
            set.push((
                "deployment.yaml".into(),
                env["name"].as_str().unwrap().to_string(),
            ));
        }
    }
    let dockerfile = read("deploy/Dockerfile");
    let mut in_env = false;
    for line in dockerfile.lines() {
        let line = line.trim();
        let rest = match line.strip_prefix("ENV ") {
            Some(rest) => rest,
            None if in_env => line,
            None => continue,
        };
        in_env = line.ends_with('\\');
        for assignment in rest.trim_end_matches('\\').split_whitespace() {
            if let Some((k, _)) = assignment.split_once('=') {
                set.push(("Dockerfile".into(), k.to_string()));
            }
        }
    }
    assert!(set.len() > 20, "parsed the files: {set:?}");
    let unknown: Vec<_> = set.iter().filter(|(_, k)| !known.contains(k)).collect();
    assert!(
        unknown.is_empty(),
        "variables the binary never reads: {unknown:?}"
    );
    // and the backend flag is surfaced in compose
    assert!(read("deploy/docker-compose.yml")
        .contains("PENDING_UPLOADS_BACKEND: ${PENDING_UPLOADS_BACKEND:-bytea}"));
}

fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("pending_uploads_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let names: BTreeSet<String> = metrics().names().into_iter().collect();
    assert!(names.len() >= 17);
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/pending-uploads.json")).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    let alerts = &yaml_docs("deploy/prometheus/alerts.yml")[0];
    let alert_exprs: Vec<String> = alerts["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10 && alert_exprs.len() >= 5);
    let mut used = BTreeSet::new();
    for e in exprs.iter().chain(&alert_exprs) {
        used.extend(metric_tokens(e));
    }
    let unknown: Vec<&String> = used
        .iter()
        .filter(|m| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            !names.contains(m.as_str()) && !names.contains(base)
        })
        .collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}");
    // every exported family is on the dashboard
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            !used
                .iter()
                .any(|u| u == *n || u.starts_with(&format!("{n}_")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not on the dashboard or alerts: {missing:?}"
    );
}
