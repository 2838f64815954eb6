//! Writes the small test dataset the data tests read (`fixtures/dataset/`), from shapes renders:
//! three webdataset shards of JPEG + caption (48 items) and an image folder in both caption
//! conventions (12 JPEGs with `.txt` files, 12 PNGs with a `metadata.jsonl`).
//!
//! `cargo run --example data_fixture -- --out fixtures/dataset`

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use unclip::data::export::{Captions, ImageFormat, write_image_folder, write_webdataset};
use unclip::data::{Dataset, Shapes};

#[derive(Parser)]
#[command(about = "Writes the committed data-loader test dataset from shapes renders")]
struct Cli {
    #[arg(long, default_value = "fixtures/dataset")]
    out: PathBuf,
    /// Side of the rendered images.
    #[arg(long, default_value_t = 64)]
    size: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let wds = Shapes::train(0, 48, cli.size)?;
    let shards = write_webdataset(&wds, &cli.out.join("webdataset"), 16, ImageFormat::Jpeg(90))
        .context("writing the webdataset shards")?;
    let txt = Shapes::train(1, 12, cli.size)?;
    write_image_folder(
        &txt,
        &cli.out.join("folder/txt"),
        ImageFormat::Jpeg(90),
        Captions::TxtFiles,
    )?;
    let jsonl = Shapes::train(2, 12, cli.size)?;
    write_image_folder(
        &jsonl,
        &cli.out.join("folder/jsonl"),
        ImageFormat::Png,
        Captions::MetadataJsonl,
    )?;
    println!(
        "wrote {} shards ({} items) and an image folder ({} items) to {}",
        shards.len(),
        wds.len(),
        txt.len() + jsonl.len(),
        cli.out.display()
    );
    Ok(())
}
