//! Generated images for smoke tests at any scale: each class has its own smooth colour
//! pattern plus per-image noise, so a model can learn it and a loss can fall.

use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};

use super::{DataError, Dataset};

pub struct Synthetic {
    classes: usize,
    len: usize,
    size: u32,
    seed: u64,
}

impl Synthetic {
    pub fn new(classes: usize, len: usize, size: u32, seed: u64) -> Self {
        Self { classes, len, size, seed }
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.len
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn label(&self, index: usize) -> usize {
        index % self.classes
    }
    fn image(&self, index: usize) -> Result<DynamicImage, DataError> {
        let class = self.label(index) as f32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(index as u64));
        let freq = 1.0 + class;
        let s = self.size as f32;
        let img = RgbImage::from_fn(self.size, self.size, |x, y| {
            let (u, v) = (x as f32 / s, y as f32 / s);
            let base = [
                (freq * u * 6.28).sin(),
                (freq * v * 6.28).cos(),
                ((u + v) * freq * 3.14).sin(),
            ];
            image::Rgb(base.map(|b| {
                let noise: f32 = rng.random_range(-0.3..0.3);
                (((b + noise) * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0) as u8
            }))
        });
        Ok(DynamicImage::ImageRgb8(img))
    }
}
