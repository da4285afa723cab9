//! Image preprocessing as the Hugging Face image processors define it
//! (`preprocessor_config.json`), computed the way transformers' PIL-backend
//! ("slow") processors compute it:
//!
//! 1. RGB ([`to_rgb`]: transparency composited onto white, as
//!    `transformers.image_transforms.convert_to_rgb`);
//! 2. resize with Pillow's filter, bit for bit ([`crate::encoders::pil_resize`]);
//!    `{"shortest_edge": s}` keeps the aspect ratio with transformers'
//!    `get_resize_output_image_size` (the long side is truncated, not rounded);
//! 3. center crop (`top = (height - crop) // 2`; zero padding when the crop
//!    is larger, as transformers pads);
//! 4. rescale in f64 then cast to f32 (`image.astype(float64) * scale`);
//! 5. normalize in f32 (`(x - mean) / std`).
//!
//! Width and height are never swapped: the tensor is (3, height, width).

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::encoders::pil_resize::{self, Filter};
use crate::{Result, WorkerError};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The resize step of a processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResizeTo {
    /// Shortest edge to this length, aspect ratio kept (CLIP).
    ShortestEdge(u32),
    /// Exactly this size (SigLIP, BLIP).
    Exact { height: u32, width: u32 },
}

/// How to turn an RGB image into a model's pixel tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageProcessor {
    /// `None`: no resize (`do_resize: false`).
    pub resize: Option<ResizeTo>,
    /// Pillow filter of the resize (`resample`).
    pub filter: Filter,
    /// Center crop to (height, width) (`do_center_crop` + `crop_size`).
    pub crop: Option<(u32, u32)>,
    /// `rescale_factor` when `do_rescale` (1/255).
    pub rescale: Option<f64>,
    /// (`image_mean`, `image_std`) when `do_normalize`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl ImageProcessor {
    /// CLIP: shortest edge to `size`, bicubic, center crop `size` x `size`,
    /// OpenAI mean/std (`openai/clip-vit-*`).
    pub fn clip(size: u32) -> Self {
        ImageProcessor {
            resize: Some(ResizeTo::ShortestEdge(size)),
            filter: Filter::Bicubic,
            crop: Some((size, size)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// SigLIP/PaliGemma: bicubic resize to `size` x `size`, mean = std = 0.5.
    pub fn siglip(size: u32) -> Self {
        ImageProcessor {
            resize: Some(ResizeTo::Exact {
                height: size,
                width: size,
            }),
            filter: Filter::Bicubic,
            crop: None,
            rescale: Some(1.0 / 255.0),
            normalize: Some(([0.5; 3], [0.5; 3])),
        }
    }

    /// Reads a transformers `preprocessor_config.json` (`file` names it in
    /// errors). Keys: `do_resize`, `size` (`shortest_edge` or
    /// `height`/`width`), `resample`, `do_center_crop`, `crop_size`,
    /// `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`,
    /// `image_std`; defaults are transformers' `BaseImageProcessor` ones.
    pub fn from_preprocessor_config(v: &serde_json::Value, file: &str) -> Result<Self> {
        let bad = |m: String| WorkerError::Load(format!("{file}: {m}"));
        let flag = |k: &str, default: bool| v[k].as_bool().unwrap_or(default);
        let size_of = |s: &serde_json::Value, key: &str| -> Result<ResizeTo> {
            let int = |x: &serde_json::Value| x.as_u64().filter(|&n| n > 0).map(|n| n as u32);
            if let Some(n) = int(s) {
                // a bare number: a square
                return Ok(ResizeTo::Exact {
                    height: n,
                    width: n,
                });
            }
            if let (Some(height), Some(width)) = (int(&s["height"]), int(&s["width"])) {
                return Ok(ResizeTo::Exact { height, width });
            }
            if let Some(e) = int(&s["shortest_edge"]) {
                if !s["longest_edge"].is_null() {
                    return Err(bad(format!(
                        "{key} = {s}: a longest_edge limit is not supported (use shortest_edge alone or height/width)"
                    )));
                }
                return Ok(ResizeTo::ShortestEdge(e));
            }
            Err(bad(format!(
                "{key} = {s} is not supported (expected {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}})"
            )))
        };
        let resize = if flag("do_resize", true) {
            Some(size_of(&v["size"], "size")?)
        } else {
            None
        };
        let code = v["resample"].as_u64().unwrap_or(2);
        let filter = Filter::from_pil_code(code).ok_or_else(|| {
            bad(format!(
                "resample = {code} is not supported (1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING are)"
            ))
        })?;
        let crop = if flag("do_center_crop", false) {
            match size_of(&v["crop_size"], "crop_size")? {
                ResizeTo::Exact { height, width } => Some((height, width)),
                ResizeTo::ShortestEdge(_) => {
                    return Err(bad(
                        "crop_size must be {\"height\", \"width\"} or a number".into()
                    ))
                }
            }
        } else {
            None
        };
        let three = |k: &str| -> Result<[f32; 3]> {
            let a = match &v[k] {
                serde_json::Value::Array(a) => a.clone(),
                x if x.is_number() => vec![x.clone(); 3],
                _ => return Err(bad(format!("{k} is missing (do_normalize is true)"))),
            };
            if a.len() != 3 || a.iter().any(|x| !x.is_number()) {
                return Err(bad(format!("{k} must be 3 numbers (one per RGB channel)")));
            }
            Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
        };
        Ok(ImageProcessor {
            resize,
            filter,
            crop,
            rescale: flag("do_rescale", true)
                .then(|| v["rescale_factor"].as_f64().unwrap_or(1.0 / 255.0)),
            normalize: if flag("do_normalize", true) {
                Some((three("image_mean")?, three("image_std")?))
            } else {
                None
            },
        })
    }

    /// A stable description for cache keys.
    pub fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    /// The size after the resize step, (width, height).
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (width, height),
            Some(ResizeTo::Exact {
                height: h,
                width: w,
            }) => (w, h),
            Some(ResizeTo::ShortestEdge(s)) => {
                // transformers: new_long = int(size * long / short)
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = (s as f64 * long as f64 / short.max(1) as f64) as u32;
                if width <= height {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// The output (height, width) for an input of this size.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.crop {
            Some(c) => c,
            None => {
                let (w, h) = self.resized_size(width, height);
                (h, w)
            }
        }
    }

    /// Resize and center crop (uint8, as the processors do before rescaling).
    pub fn resize_crop(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = self.resized_size(img.width(), img.height());
        let img = if (w, h) == img.dimensions() {
            img.clone()
        } else {
            pil_resize::resize(img, w, h, self.filter)
        };
        match self.crop {
            None => img,
            Some((ch, cw)) => center_crop(&img, ch, cw),
        }
    }

    /// Pixel values of one image, (3, height, width) row-major.
    pub fn pixel_values(&self, img: &RgbImage) -> Vec<f32> {
        let img = self.resize_crop(img);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let raw = img.as_raw();
        let mut out = vec![0f32; 3 * h * w];
        for ch in 0..3 {
            for i in 0..h * w {
                let v = raw[i * 3 + ch];
                let mut x = match self.rescale {
                    Some(s) => (v as f64 * s) as f32,
                    None => v as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[ch]) / std[ch];
                }
                out[ch * h * w + i] = x;
            }
        }
        out
    }

    /// Preprocesses a batch into a (B, 3, H, W) f32 tensor. Every image must
    /// come out at the same size (always true with a crop or an exact resize).
    pub fn batch(&self, images: &[&RgbImage], device: &Device) -> Result<Tensor> {
        let sizes: Vec<(u32, u32)> = images
            .iter()
            .map(|i| self.output_size(i.width(), i.height()))
            .collect();
        let (h, w) = sizes.first().copied().unwrap_or((1, 1));
        if sizes.iter().any(|&s| s != (h, w)) {
            return Err(WorkerError::Invalid(format!(
                "images of a batch come out at different sizes ({sizes:?}); preprocess them one at a time"
            )));
        }
        let mut data = Vec::with_capacity(images.len() * 3 * (h * w) as usize);
        for img in images {
            data.extend(self.pixel_values(img));
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, h as usize, w as usize),
            device,
        )?)
    }
}

/// transformers' `center_crop`: `top = (height - crop_height) // 2` (same
/// for left); a crop larger than the image pads with zeros around it
/// (`ceil` of half the missing rows/columns before it).
pub fn center_crop(img: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    // offsets of the crop in image coordinates (floor division, may be negative)
    let top = if h >= ch {
        (h - ch) / 2
    } else {
        -((ch - h + 1) / 2)
    };
    let left = if w >= cw {
        (w - cw) / 2
    } else {
        -((cw - w + 1) / 2)
    };
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && sx < w && sy < h {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// An image as RGB the way transformers' `convert_to_rgb` makes it from a
/// PIL image: grey replicated, transparency (an alpha channel, or a palette
/// or colour-key transparency that the decoder expanded to alpha)
/// composited onto opaque white with Pillow's integer `alpha_composite`.
/// 16-bit RGB keeps the high byte (Pillow decodes 16-bit RGB PNGs so).
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i.clone(),
        DynamicImage::ImageLuma8(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            let v = i.get_pixel(x, y).0[0];
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA8(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            let [v, a] = i.get_pixel(x, y).0;
            let c = over_white(v, a);
            image::Rgb([c, c, c])
        }),
        DynamicImage::ImageRgba8(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            let [r, g, b, a] = i.get_pixel(x, y).0;
            image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
        }),
        DynamicImage::ImageRgb16(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb(p.map(|v| (v >> 8) as u8))
        }),
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            let p = i.get_pixel(x, y).0.map(|v| (v >> 8) as u8);
            image::Rgb([
                over_white(p[0], p[3]),
                over_white(p[1], p[3]),
                over_white(p[2], p[3]),
            ])
        }),
        other => other.to_rgb8(),
    }
}

/// One channel of Pillow's `alpha_composite(white, src)` (libImaging
/// AlphaComposite.c, 7-bit precision) — exact for all 65536 (value, alpha).
pub fn over_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PB: u32 = 7;
    let (v, a) = (v as u32, a as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PB) / outa255;
    let coef2 = 255 * (1 << PB) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << PB);
    ((((tmp >> 8) + tmp) >> 8) >> PB) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_square_images_keep_orientation() {
        // A wide image, left half red and right half blue: after a CLIP
        // shortest-edge resize and center crop the red/blue split must stay vertical.
        let img = RgbImage::from_fn(64, 32, |x, _| {
            if x < 32 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let p = ImageProcessor::clip(16);
        let out = p.resize_crop(&img);
        assert_eq!((out.width(), out.height()), (16, 16));
        assert!(out.get_pixel(1, 8).0[0] > 200 && out.get_pixel(14, 8).0[2] > 200);
        let t = p.batch(&[&img, &img], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 16, 16]);
    }

    #[test]
    fn shortest_edge_truncates_like_transformers() {
        let p = ImageProcessor::clip(224);
        // int(224 * 256 / 170) = int(337.32) = 337; 224 * 301 / 200 = 337.12
        assert_eq!(p.resized_size(256, 170), (337, 224));
        assert_eq!(p.resized_size(200, 301), (224, 337));
        // 224 * 300 / 199 = 337.69 -> 337 (rounding would give 338)
        assert_eq!(p.resized_size(300, 199), (337, 224));
    }

    #[test]
    fn center_crop_offsets_and_padding() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 1]));
        // (4 - 2) // 2 = 1, (5 - 2) // 2 = 1
        let c = center_crop(&img, 2, 2);
        assert_eq!(c.get_pixel(0, 0).0, [1, 1, 1]);
        // larger than the image: ceil((6 - 4) / 2) = 1 row and ceil((6 - 5) / 2) = 1 column before
        let c = center_crop(&img, 6, 6);
        assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(c.get_pixel(1, 1).0, [0, 0, 1]);
        assert_eq!(c.get_pixel(5, 1).0, [4, 0, 1]);
    }

    /// Pillow 13 `Image.alpha_composite(white, rgba).convert("RGB")` values.
    #[test]
    fn alpha_composite_matches_pillow() {
        for (v, a, want) in [
            (0, 0, 255),
            (0, 255, 0),
            (200, 255, 200),
            (0, 128, 127),
            (100, 1, 254),
            (37, 200, 84),
            (255, 77, 255),
            (10, 254, 11),
        ] {
            assert_eq!(over_white(v, a), want, "value {v} alpha {a}");
        }
    }

    #[test]
    fn preprocessor_config_is_parsed() {
        let v: serde_json::Value = serde_json::json!({
            "do_center_crop": true, "crop_size": {"height": 224, "width": 224},
            "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 224}
        });
        let p = ImageProcessor::from_preprocessor_config(&v, "preprocessor_config.json").unwrap();
        assert_eq!(p, ImageProcessor::clip(224));
        let bad = serde_json::json!({"size": {"longest_edge": 3}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]});
        let e = ImageProcessor::from_preprocessor_config(&bad, "x/preprocessor_config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/preprocessor_config.json") && e.contains("size"),
            "{e}"
        );
    }
}
