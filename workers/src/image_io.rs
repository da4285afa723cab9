//! Decoding and encoding image files, with errors that name the input.

use std::io::Cursor;

use image::{ImageFormat, RgbImage};

use crate::{Result, WorkerError};

/// Decodes an image file's bytes to RGB. `input` names it in errors.
/// Empty files, truncated files and non-images fail with the reason.
pub fn decode_rgb(input: &str, bytes: &[u8]) -> Result<RgbImage> {
    let bad = |reason: String| WorkerError::BadImage {
        input: input.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(bad("the file is empty (0 bytes)".into()));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| bad("not a recognised image format (is it really an image?)".into()))?;
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| bad(format!("{format:?} data is corrupt or truncated: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(bad("the image has zero width or height".into()));
    }
    // transparency composited on white, as the reference processors do
    Ok(crate::preprocess::to_rgb(&img))
}

/// How generated images are stored in the dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageEncoding {
    Png,
    Jpeg,
}

impl ImageEncoding {
    pub fn extension(self) -> &'static str {
        match self {
            ImageEncoding::Png => "png",
            ImageEncoding::Jpeg => "jpg",
        }
    }
}

/// Encodes an RGB image as PNG or JPEG (`quality` 1..=100, JPEG only).
pub fn encode(img: &RgbImage, encoding: ImageEncoding, quality: u8) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    match encoding {
        ImageEncoding::Png => img
            .write_to(&mut out, ImageFormat::Png)
            .map_err(|e| WorkerError::Invalid(format!("PNG encoding failed: {e}")))?,
        ImageEncoding::Jpeg => {
            let enc =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            img.write_with_encoder(enc)
                .map_err(|e| WorkerError::Invalid(format!("JPEG encoding failed: {e}")))?
        }
    }
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_inputs_are_named_errors() {
        let e = decode_rgb("x/empty.jpg", &[]).unwrap_err().to_string();
        assert!(e.contains("x/empty.jpg") && e.contains("empty"), "{e}");
        let e = decode_rgb("notes.jpg", b"hello, I am text")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("notes.jpg") && e.contains("not a recognised image"),
            "{e}"
        );
        let img = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let png = encode(&img, ImageEncoding::Png, 90).unwrap();
        let e = decode_rgb("cut.png", &png[..png.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cut.png") && e.contains("corrupt or truncated"),
            "{e}"
        );
        assert_eq!(decode_rgb("ok.png", &png).unwrap(), img);
    }
}
