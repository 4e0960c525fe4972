// `sqlx::migrate!` embeds migrations/ at compile time, but cargo does not know that: without
// this, a new migration file is silently left out of the binary until some Rust file changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
