//! The credentials `dev` generates on its first start and keeps in the data
//! folder, so a restart shows the same API key, ingest token and secret key.

use std::path::{Path, PathBuf};

use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_storage::tenants::generate_api_key;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "dev-credentials.json";

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevCredentials {
    pub api_key: String,
    pub ingest_token: String,
    pub secret_key: String,
}

impl std::fmt::Debug for DevCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCredentials([redacted])")
    }
}

impl DevCredentials {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(data_dir);
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
            return serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged; delete it to generate new credentials", path.display()));
        }
        let credentials = DevCredentials {
            api_key: generate_api_key(),
            ingest_token: generate_api_key().replacen("aegis_", "aegis_ingest_", 1),
            secret_key: SecretCipher::generate_key(),
        };
        std::fs::create_dir_all(data_dir).with_context(|| format!("failed to create {}", data_dir.display()))?;
        write_private(&path, &serde_json::to_string_pretty(&credentials)?)?;
        Ok(credentials)
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("failed to write {}", path.display()))
}
