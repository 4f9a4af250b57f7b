//! A real browser for the tests of pages: Debian's Chromium, driven by
//! `tests/browser/open-page.mjs` (playwright-core, which never downloads a
//! browser of its own). `.ci/run` installs both; elsewhere a test that needs
//! them says so loudly and skips, and with `CI` set it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// What the browser saw of one page.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PageVisit {
    /// Every request the page made, in order.
    pub requests: Vec<Request>,
    /// The console's errors and the page's uncaught exceptions.
    pub console_errors: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Request {
    pub url: String,
    pub failed: bool,
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Whether the browser and its driver are installed; a loud notice (or, in
/// CI, a failure) when not.
pub fn available() -> bool {
    let driver = browser_dir().join("node_modules/playwright-core/package.json");
    let missing = if !chromium().is_file() {
        Some(format!(
            "no Chromium at {} (apt-get install chromium)",
            chromium().display()
        ))
    } else if !driver.is_file() {
        Some(format!(
            "playwright-core is not installed (npm ci --prefix {})",
            browser_dir().display()
        ))
    } else if Command::new("node").arg("--version").output().is_err() {
        Some("no `node` on the PATH".to_owned())
    } else {
        None
    };
    let Some(why) = missing else { return true };
    if std::env::var_os("CI").is_some() {
        panic!("a browser test needs what .ci/run installs: {why}");
    }
    eprintln!("\n!!!!!!!! SKIPPING A BROWSER TEST: {why} !!!!!!!!\n");
    false
}

/// Opens `url`, waits for `selector`, saves a screenshot at `screenshot`
/// (the tests put them under the build's target folder: never committed) and
/// reports what the page did.
pub fn visit(url: &str, selector: &str, screenshot: &Path) -> PageVisit {
    if let Some(folder) = screenshot.parent() {
        std::fs::create_dir_all(folder).expect("create the screenshots folder");
    }
    let output = Command::new("node")
        .arg(browser_dir().join("open-page.mjs"))
        .args([url, selector])
        .arg(screenshot)
        .env("CHROMIUM", chromium())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the browser failed on {url}: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(report).unwrap_or_else(|error| panic!("unreadable report ({error}): {stdout}"))
}
