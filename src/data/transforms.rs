//! Training and evaluation transforms, as DeiT uses them: random-resized crop + flip (+
//! RandAugment and random erasing where configured) for training, resize + center crop for
//! evaluation; both end in per-channel normalization into a `[channels, size, size]` f32 buffer.

use image::imageops::FilterType;
use image::DynamicImage;
use rand::Rng;
use rand_distr::StandardNormal;

use super::randaugment::RandAugment;

#[derive(Debug, Clone)]
pub struct Transform {
    pub size: u32,
    pub channels: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Train(TrainAugment),
    Eval { crop_pct: f32 },
}

/// The per-image training augmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainAugment {
    pub crop_scale: [f32; 2],
    pub hflip: bool,
    pub randaugment: Option<RandAugment>,
    /// Probability of erasing one random rectangle (timm's `RandomErasing`, per-pixel noise).
    pub erasing: f32,
}

impl TrainAugment {
    /// Crop and flip only.
    pub fn basic(crop_scale: [f32; 2], hflip: bool) -> Self {
        Self { crop_scale, hflip, randaugment: None, erasing: 0.0 }
    }
}

impl Transform {
    /// Appends the transformed image, `channels * size * size` values in CHW order, to `out`.
    pub fn apply(&self, img: &DynamicImage, rng: &mut impl Rng, out: &mut Vec<f32>) {
        let start = out.len();
        match self.mode {
            Mode::Train(aug) => {
                let mut img = random_resized_crop(img, self.size, aug.crop_scale, rng);
                if aug.hflip && rng.random_bool(0.5) {
                    img = img.fliph();
                }
                if let Some(ra) = aug.randaugment {
                    let mut rgb = img.to_rgb8();
                    let fill = std::array::from_fn(|c| (self.mean[c.min(self.mean.len() - 1)] * 255.0).round() as u8);
                    ra.apply(&mut rgb, fill, rng);
                    img = DynamicImage::ImageRgb8(rgb);
                }
                self.normalize(&img, out);
                if aug.erasing > 0.0 && rng.random_bool(aug.erasing as f64) {
                    self.erase(&mut out[start..], rng);
                }
            }
            Mode::Eval { crop_pct } => self.normalize(&resize_center_crop(img, self.size, crop_pct), out),
        }
    }

    /// timm's RandomErasing (mode "pixel"): one rectangle of 2% to 1/3 of the area, aspect
    /// ratio in [0.3, 3.3] (log-uniform), filled with standard normal noise in normalized
    /// space; ten tries to fit it.
    fn erase(&self, chw: &mut [f32], rng: &mut impl Rng) {
        let size = self.size as usize;
        let area = (size * size) as f32;
        let (lo, hi) = (0.3f32.ln(), (1.0f32 / 0.3).ln());
        for _ in 0..10 {
            let target = area * rng.random_range(0.02..=1.0 / 3.0);
            let ratio = rng.random_range(lo..=hi).exp();
            let h = (target * ratio).sqrt().round() as usize;
            let w = (target / ratio).sqrt().round() as usize;
            if h == 0 || w == 0 || h >= size || w >= size {
                continue;
            }
            let (top, left) = (rng.random_range(0..=size - h), rng.random_range(0..=size - w));
            for c in 0..self.channels {
                for y in top..top + h {
                    for x in left..left + w {
                        chw[c * size * size + y * size + x] = rng.sample(StandardNormal);
                    }
                }
            }
            return;
        }
    }

    fn normalize(&self, img: &DynamicImage, out: &mut Vec<f32>) {
        let plane = (self.size * self.size) as usize;
        let start = out.len();
        out.resize(start + self.channels * plane, 0.0);
        let dst = &mut out[start..];
        if self.channels == 1 {
            for (i, p) in img.to_luma8().pixels().enumerate() {
                dst[i] = (p.0[0] as f32 / 255.0 - self.mean[0]) / self.std[0];
            }
        } else {
            // Grayscale becomes three equal channels here.
            for (i, p) in img.to_rgb8().pixels().enumerate() {
                for c in 0..3 {
                    dst[c * plane + i] = (p.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
    }
}

/// torchvision's RandomResizedCrop: area in `scale`, aspect ratio in [3/4, 4/3] (log-uniform),
/// ten tries, then a center crop.
fn random_resized_crop(img: &DynamicImage, size: u32, scale: [f32; 2], rng: &mut impl Rng) -> DynamicImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let area = w * h;
    let (lo, hi) = ((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let ratio = rng.random_range(lo..=hi).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=(w - cw) as u32);
            let y = rng.random_range(0..=(h - ch) as u32);
            return resize_to(img.crop_imm(x, y, cw as u32, ch as u32), size);
        }
    }
    let side = w.min(h) as u32;
    resize_to(img.crop_imm((img.width() - side) / 2, (img.height() - side) / 2, side, side), size)
}

/// A crop already at the target size is kept as is: resampling it would only blur it.
fn resize_to(img: DynamicImage, size: u32) -> DynamicImage {
    if img.width() == size && img.height() == size {
        img
    } else {
        img.resize_exact(size, size, FilterType::Triangle)
    }
}

fn resize_center_crop(img: &DynamicImage, size: u32, crop_pct: f32) -> DynamicImage {
    let short = (size as f32 / crop_pct).round() as u32;
    let (w, h) = (img.width(), img.height());
    let resized = if w.min(h) == short {
        img.clone()
    } else if w <= h {
        img.resize_exact(short, ((h as u64 * short as u64) / w as u64) as u32, FilterType::Triangle)
    } else {
        img.resize_exact(((w as u64 * short as u64) / h as u64) as u32, short, FilterType::Triangle)
    };
    let (w, h) = (resized.width(), resized.height());
    resized.crop_imm((w - size) / 2, (h - size) / 2, size, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn transform(mode: Mode, channels: usize) -> Transform {
        Transform { size: 8, channels, mean: vec![0.5; channels], std: vec![0.25; channels], mode }
    }

    #[test]
    fn eval_crop_is_exact_at_crop_pct_one_and_grayscale_fills_three_channels() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 8, |x, _| image::Luma([(x * 32) as u8])));
        let mut out = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        transform(Mode::Eval { crop_pct: 1.0 }, 3).apply(&img, &mut rng, &mut out);
        assert_eq!(out.len(), 3 * 64);
        let expect = |x: usize| ((x * 32) as f32 / 255.0 - 0.5) / 0.25;
        for c in 0..3 {
            assert!((out[c * 64 + 3] - expect(3)).abs() < 1e-6);
        }
    }

    #[test]
    fn eval_resizes_short_side_then_center_crops() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::new(40, 20));
        let out = resize_center_crop(&img, 8, 0.5);
        assert_eq!((out.width(), out.height()), (8, 8));
    }

    #[test]
    fn full_area_crop_of_a_target_size_image_is_exact() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 30 + y) as u8])));
        let t = transform(Mode::Train(TrainAugment::basic([1.0, 1.0], false)), 1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(1), &mut a);
        transform(Mode::Eval { crop_pct: 1.0 }, 1).apply(&img, &mut rand::rngs::StdRng::seed_from_u64(1), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn train_crops_are_deterministic_for_a_seed() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(32, 24, |x, y| image::Rgb([x as u8 * 7, y as u8 * 9, 3])));
        let t = transform(Mode::Train(TrainAugment::basic([0.08, 1.0], true)), 3);
        let run = |seed| {
            let mut out = Vec::new();
            t.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(seed), &mut out);
            out
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn erasing_replaces_one_rectangle_with_noise() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(16, 16, image::Luma([128])));
        let mut t = transform(Mode::Train(TrainAugment { erasing: 1.0, ..TrainAugment::basic([1.0, 1.0], false) }), 1);
        t.size = 16;
        let mut out = Vec::new();
        t.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(5), &mut out);
        let plain = (128.0 / 255.0 - 0.5) / 0.25;
        let erased = out.iter().filter(|&&v| v != plain).count();
        assert!((256 * 2 / 100..=256 / 3 + 16).contains(&erased), "{erased} of 256 erased");
    }

    #[test]
    fn randaugment_runs_inside_the_train_transform_on_grayscale() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 30 + y) as u8])));
        let ra = Some(RandAugment { ops: 2, magnitude: 9.0 });
        let t = transform(Mode::Train(TrainAugment { randaugment: ra, ..TrainAugment::basic([1.0, 1.0], false) }), 1);
        let plain = transform(Mode::Eval { crop_pct: 1.0 }, 1);
        let changed = (0..20)
            .filter(|&s| {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                t.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(s), &mut a);
                plain.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(s), &mut b);
                assert_eq!(a.len(), 64);
                a != b
            })
            .count();
        assert!(changed > 5, "{changed} of 20 changed");
    }
}
