//! Image preprocessing as the Hugging Face image processors define it
//! (`preprocessor_config.json`): resize, center crop, rescale, normalize.
//! Width and height are never swapped: the tensor is (3, height, width).

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, RgbImage};

use crate::Result;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How to turn an RGB image into a model's pixel tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageProcessor {
    /// Resize so the shortest edge has this length (CLIP), or to exactly
    /// `crop_size` x `crop_size` when `None` (SigLIP style).
    pub shortest_edge: Option<u32>,
    /// Center crop to a square of this side.
    pub crop_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    pub fn clip(size: u32) -> Self {
        ImageProcessor {
            shortest_edge: Some(size),
            crop_size: size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// SigLIP/PaliGemma: plain resize to a square, mean = std = 0.5.
    pub fn siglip(size: u32) -> Self {
        ImageProcessor {
            shortest_edge: None,
            crop_size: size,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// A stable description for cache keys.
    pub fn fingerprint(&self) -> String {
        format!("{self:?}")
    }

    /// Resizes and crops to (crop_size, crop_size) RGB.
    pub fn resize_crop(&self, img: &RgbImage) -> RgbImage {
        let c = self.crop_size;
        match self.shortest_edge {
            None => image::imageops::resize(img, c, c, FilterType::CatmullRom),
            Some(edge) => {
                let (w, h) = (img.width() as f64, img.height() as f64);
                let scale = edge as f64 / w.min(h);
                let nw = ((w * scale).round() as u32).max(edge);
                let nh = ((h * scale).round() as u32).max(edge);
                let resized = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
                let left = (nw.saturating_sub(c)) / 2;
                let top = (nh.saturating_sub(c)) / 2;
                image::imageops::crop_imm(&resized, left, top, c.min(nw), c.min(nh)).to_image()
            }
        }
    }

    /// Preprocesses a batch into a (B, 3, crop, crop) f32 tensor.
    pub fn batch(&self, images: &[&RgbImage], device: &Device) -> Result<Tensor> {
        let c = self.crop_size as usize;
        let mut data = Vec::with_capacity(images.len() * 3 * c * c);
        for img in images {
            let img = self.resize_crop(img);
            for ch in 0..3 {
                for y in 0..c {
                    for x in 0..c {
                        let v = img.get_pixel(x as u32, y as u32).0[ch] as f32 / 255.0;
                        data.push((v - self.mean[ch]) / self.std[ch]);
                    }
                }
            }
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, c, c), device)?)
    }
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
}
