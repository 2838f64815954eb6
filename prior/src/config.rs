//! The prior's `config.json` (diffusers `PriorTransformer` keys and defaults).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Hyper-parameters of a [`crate::PriorTransformer`], read from the checkpoint's `config.json`.
///
/// Field names and defaults are diffusers' (`PriorTransformer.__init__`), so Karlo's file, which
/// lists only some keys, reads as it does in Python. Options Karlo does not use are accepted
/// where they are cheap to honour (`norm_in_type`, `embedding_proj_norm_type`,
/// `embedding_proj_dim`, `clip_embed_dim`) and refused by [`PriorConfig::validate`] otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorConfig {
    #[serde(default = "default_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "default_layers")]
    pub num_layers: i64,
    /// Size of the CLIP image embedding (the diffused variable) and of the text hidden states.
    #[serde(default = "default_embedding_dim")]
    pub embedding_dim: i64,
    /// Number of text tokens (CLIP's context length, 77).
    #[serde(default = "default_num_embeddings")]
    pub num_embeddings: i64,
    /// Tokens after the text: text embedding, timestep, noisy latent, `prd` query.
    #[serde(default = "default_additional_embeddings")]
    pub additional_embeddings: i64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_act")]
    pub time_embed_act_fn: String,
    #[serde(default)]
    pub norm_in_type: Option<String>,
    #[serde(default)]
    pub embedding_proj_norm_type: Option<String>,
    #[serde(default = "default_encoder_hid_proj_type")]
    pub encoder_hid_proj_type: Option<String>,
    #[serde(default = "default_added_emb_type")]
    pub added_emb_type: Option<String>,
    #[serde(default)]
    pub time_embed_dim: Option<i64>,
    #[serde(default)]
    pub embedding_proj_dim: Option<i64>,
    #[serde(default)]
    pub clip_embed_dim: Option<i64>,
}

fn default_heads() -> i64 {
    32
}
fn default_head_dim() -> i64 {
    64
}
fn default_layers() -> i64 {
    20
}
fn default_embedding_dim() -> i64 {
    768
}
fn default_num_embeddings() -> i64 {
    77
}
fn default_additional_embeddings() -> i64 {
    4
}
fn default_act() -> String {
    "silu".into()
}
fn default_encoder_hid_proj_type() -> Option<String> {
    Some("linear".into())
}
fn default_added_emb_type() -> Option<String> {
    Some("prd".into())
}

impl Default for PriorConfig {
    /// Karlo's prior (diffusers' defaults).
    fn default() -> Self {
        Self {
            num_attention_heads: default_heads(),
            attention_head_dim: default_head_dim(),
            num_layers: default_layers(),
            embedding_dim: default_embedding_dim(),
            num_embeddings: default_num_embeddings(),
            additional_embeddings: default_additional_embeddings(),
            dropout: 0.0,
            time_embed_act_fn: default_act(),
            norm_in_type: None,
            embedding_proj_norm_type: None,
            encoder_hid_proj_type: default_encoder_hid_proj_type(),
            added_emb_type: default_added_emb_type(),
            time_embed_dim: None,
            embedding_proj_dim: None,
            clip_embed_dim: None,
        }
    }
}

impl PriorConfig {
    /// Karlo v1 alpha's prior (kakaobrain/karlo-v1-alpha `prior/config.json`).
    pub fn karlo() -> Self {
        Self::default()
    }

    /// The tiny prior of diffusers' unCLIP pipeline tests (2 heads of 12, 32-d embeddings, 1 layer).
    pub fn tiny() -> Self {
        Self {
            num_attention_heads: 2,
            attention_head_dim: 12,
            num_layers: 1,
            embedding_dim: 32,
            ..Self::default()
        }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = unclip_core::config::read_model_json(path)?;
        cfg.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(cfg)
    }

    /// Writes this config as `config.json` (with `_class_name` so diffusers can read it back).
    pub fn to_file(&self, path: &Path) -> Result<()> {
        let mut value = serde_json::to_value(self)
            .map_err(|e| Error::Config(format!("cannot serialize config: {e}")))?;
        if let Some(map) = value.as_object_mut() {
            map.insert("_class_name".into(), "PriorTransformer".into());
        }
        Ok(unclip_core::config::write_json(path, &value)?)
    }

    /// Width of the transformer: heads x head dim.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Size of the text embedding input (`proj_embedding`).
    pub fn embedding_proj_dim(&self) -> i64 {
        self.embedding_proj_dim.unwrap_or(self.embedding_dim)
    }

    /// Size of the predicted image embedding.
    pub fn clip_embed_dim(&self) -> i64 {
        self.clip_embed_dim.unwrap_or(self.embedding_dim)
    }

    /// Tokens in the transformer's sequence: text tokens plus the additional ones.
    pub fn seq_len(&self) -> i64 {
        self.num_embeddings + self.additional_embeddings
    }

    /// Refuses sizes that cannot build a model and options this crate does not implement.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("embedding_dim", self.embedding_dim),
            ("num_embeddings", self.num_embeddings),
            ("embedding_proj_dim", self.embedding_proj_dim()),
            ("clip_embed_dim", self.clip_embed_dim()),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(Error::Config(format!("{name} must be positive, got {v}")));
            }
        }
        if self.num_layers < 0 {
            return Err(Error::Config(format!("num_layers must be >= 0, got {}", self.num_layers)));
        }
        if self.dropout != 0.0 {
            return Err(Error::Config(format!(
                "dropout {} is not supported (only 0.0, as Karlo)",
                self.dropout
            )));
        }
        if self.time_embed_act_fn != "silu" {
            return Err(Error::Config(format!(
                "time_embed_act_fn {:?} is not supported (only \"silu\")",
                self.time_embed_act_fn
            )));
        }
        for (name, v) in [
            ("norm_in_type", &self.norm_in_type),
            ("embedding_proj_norm_type", &self.embedding_proj_norm_type),
        ] {
            if v.as_deref().is_some_and(|k| k != "layer") {
                return Err(Error::Config(format!(
                    "{name} {v:?} is not supported (only \"layer\" or null)"
                )));
            }
        }
        if self.encoder_hid_proj_type.as_deref() != Some("linear") {
            return Err(Error::Config(format!(
                "encoder_hid_proj_type {:?} is not supported (only \"linear\")",
                self.encoder_hid_proj_type
            )));
        }
        if self.added_emb_type.as_deref() != Some("prd") {
            return Err(Error::Config(format!(
                "added_emb_type {:?} is not supported (only \"prd\")",
                self.added_emb_type
            )));
        }
        if self.time_embed_dim.is_some_and(|d| d != self.inner_dim()) {
            return Err(Error::Config(format!(
                "time_embed_dim {:?} is not supported (only null or heads x head dim = {})",
                self.time_embed_dim,
                self.inner_dim()
            )));
        }
        // text tokens + [text embedding, timestep, latent, prd] must fill the positional table.
        if self.additional_embeddings != 4 {
            return Err(Error::Config(format!(
                "additional_embeddings must be 4 (text embedding, timestep, latent, prd tokens), got {}",
                self.additional_embeddings
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karlo_file_reads_with_defaults() {
        // The keys of kakaobrain/karlo-v1-alpha prior/config.json.
        let text = r#"{"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0.dev0",
            "attention_head_dim": 64, "embedding_dim": 768, "num_attention_heads": 32,
            "num_embeddings": 77, "num_layers": 20}"#;
        let cfg: PriorConfig = serde_json::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg, PriorConfig::karlo());
        assert_eq!((cfg.inner_dim(), cfg.seq_len(), cfg.clip_embed_dim()), (2048, 81, 768));
    }

    #[test]
    fn unsupported_options_are_refused() {
        let bad = [
            PriorConfig { added_emb_type: None, ..PriorConfig::tiny() },
            PriorConfig { encoder_hid_proj_type: None, ..PriorConfig::tiny() },
            PriorConfig { norm_in_type: Some("group".into()), ..PriorConfig::tiny() },
            PriorConfig { time_embed_dim: Some(7), ..PriorConfig::tiny() },
            PriorConfig { additional_embeddings: 3, ..PriorConfig::tiny() },
            PriorConfig { num_attention_heads: 0, ..PriorConfig::tiny() },
            PriorConfig { dropout: 0.1, ..PriorConfig::tiny() },
            PriorConfig { time_embed_act_fn: "gelu".into(), ..PriorConfig::tiny() },
        ];
        for cfg in bad {
            assert!(matches!(cfg.validate(), Err(Error::Config(_))), "{cfg:?}");
        }
        PriorConfig { norm_in_type: Some("layer".into()), ..PriorConfig::tiny() }
            .validate()
            .unwrap();
    }
}
