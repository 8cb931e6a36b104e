//! RandAugment as DeiT trains with it (timm's `rand-m9-mstd0.5-inc1`): `ops` operations drawn
//! uniformly from the "increasing" set, each applied with probability 0.5 at a magnitude drawn
//! around `magnitude` (std 0.5, clipped to [0, 10]); a larger magnitude is always a stronger
//! change. Geometric operations fill uncovered pixels with the dataset mean, as timm does.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// The largest magnitude; timm's `_LEVEL_DENOM`.
const MAX_LEVEL: f32 = 10.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    pub ops: usize,
    pub magnitude: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

impl RandAugment {
    /// `fill` is the per-channel mean in [0, 255] for pixels that geometric operations uncover.
    pub fn apply(&self, img: &mut RgbImage, fill: [u8; 3], rng: &mut impl Rng) {
        let spread = Normal::new(self.magnitude, 0.5).expect("a finite magnitude");
        for _ in 0..self.ops {
            let op = OPS[rng.random_range(0..OPS.len())];
            if !rng.random_bool(0.5) {
                continue;
            }
            let level = spread.sample(rng).clamp(0.0, MAX_LEVEL) / MAX_LEVEL;
            // Geometric and colour-factor operations go either way with equal chance.
            let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            apply_op(op, img, level, sign, fill);
        }
    }
}

fn apply_op(op: Op, img: &mut RgbImage, level: f32, sign: f32, fill: [u8; 3]) {
    let (w, h) = (img.width() as f32, img.height() as f32);
    match op {
        Op::AutoContrast => auto_contrast(img),
        Op::Equalize => equalize(img),
        Op::Invert => map_pixels(img, |v| 255 - v),
        Op::Rotate => {
            let (sin, cos) = (sign * 30.0 * level).to_radians().sin_cos();
            let (cx, cy) = (w / 2.0, h / 2.0);
            // Inverse map of a rotation about the centre.
            affine(img, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], fill)
        }
        Op::Posterize => {
            // Bits kept: 4 at level 0, none at the top level.
            let bits = 4 - (level * 4.0) as u32;
            let keep = if bits == 0 { 0 } else { !(0xFFu8 >> bits) };
            map_pixels(img, |v| v & keep)
        }
        Op::Solarize => {
            let threshold = 256.0 - level * 256.0;
            map_pixels(img, |v| if v as f32 >= threshold { 255 - v } else { v })
        }
        Op::SolarizeAdd => {
            let add = (level * 110.0) as u16;
            map_pixels(img, |v| if v < 128 { (v as u16 + add).min(255) as u8 } else { v })
        }
        Op::Color => {
            let (gray, stride) = (grayscale(img), img.width() as usize);
            blend(img, |x, y, _| gray[y * stride + x] as f32, 1.0 + sign * 0.9 * level)
        }
        Op::Contrast => {
            let gray = grayscale(img);
            let mean = gray.iter().map(|&g| g as f32).sum::<f32>() / gray.len() as f32;
            blend(img, |_, _, _| mean, 1.0 + sign * 0.9 * level)
        }
        Op::Brightness => blend(img, |_, _, _| 0.0, 1.0 + sign * 0.9 * level),
        Op::Sharpness => {
            let smooth = smoothed(img);
            blend(img, |x, y, c| smooth.get_pixel(x as u32, y as u32).0[c] as f32, 1.0 + sign * 0.9 * level)
        }
        Op::ShearX => affine(img, [1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0], fill),
        Op::ShearY => affine(img, [1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0], fill),
        Op::TranslateX => affine(img, [1.0, 0.0, sign * 0.45 * level * w, 0.0, 1.0, 0.0], fill),
        Op::TranslateY => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * level * h], fill),
    }
}

fn map_pixels(img: &mut RgbImage, f: impl Fn(u8) -> u8) {
    for v in img.iter_mut() {
        *v = f(*v);
    }
}

/// PIL's `ImageEnhance`: `degenerate + factor * (img - degenerate)`, clipped.
fn blend(img: &mut RgbImage, degenerate: impl Fn(usize, usize, usize) -> f32, factor: f32) {
    for (x, y, p) in img.enumerate_pixels_mut() {
        for c in 0..3 {
            let d = degenerate(x as usize, y as usize, c);
            p.0[c] = (d + factor * (p.0[c] as f32 - d)).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// ITU-R 601 luma, as PIL's `convert("L")`.
fn grayscale(img: &RgbImage) -> Vec<u8> {
    img.pixels().map(|p| ((299 * p.0[0] as u32 + 587 * p.0[1] as u32 + 114 * p.0[2] as u32) / 1000) as u8).collect()
}

/// PIL's SMOOTH filter (3x3, centre weight 5, total 13); borders keep their pixels.
fn smoothed(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = img.clone();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let mut acc = [0u32; 3];
            for dy in 0..3 {
                for dx in 0..3 {
                    let weight = if dx == 1 && dy == 1 { 5 } else { 1 };
                    let p = img.get_pixel(x + dx - 1, y + dy - 1);
                    for c in 0..3 {
                        acc[c] += weight * p.0[c] as u32;
                    }
                }
            }
            out.put_pixel(x, y, Rgb(acc.map(|a| ((a + 6) / 13) as u8)));
        }
    }
    out
}

/// Stretches each channel's range to [0, 255].
fn auto_contrast(img: &mut RgbImage) {
    for c in 0..3 {
        let (lo, hi) = img.pixels().fold((255u8, 0u8), |(lo, hi), p| (lo.min(p.0[c]), hi.max(p.0[c])));
        if hi > lo {
            let scale = 255.0 / (hi - lo) as f32;
            for p in img.pixels_mut() {
                p.0[c] = ((p.0[c] - lo) as f32 * scale).round() as u8;
            }
        }
    }
}

/// Per-channel histogram equalization, as PIL's `ImageOps.equalize`.
fn equalize(img: &mut RgbImage) {
    for c in 0..3 {
        let mut hist = [0usize; 256];
        for p in img.pixels() {
            hist[p.0[c] as usize] += 1;
        }
        let last = hist.iter().rposition(|&n| n > 0).unwrap_or(0);
        let step = (hist.iter().sum::<usize>() - hist[last]) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for (v, count) in hist.iter().enumerate() {
            lut[v] = (n / step).min(255) as u8;
            n += count;
        }
        for p in img.pixels_mut() {
            p.0[c] = lut[p.0[c] as usize];
        }
    }
}

/// PIL's `Image.transform(AFFINE)`: output pixel (x, y) samples the input at
/// `(a x + b y + c, d x + e y + f)`, bilinearly, `fill` outside.
fn affine(img: &mut RgbImage, [a, b, c, d, e, f]: [f32; 6], fill: [u8; 3]) {
    let src = img.clone();
    let (w, h) = (src.width() as i64, src.height() as i64);
    let at = |x: i64, y: i64, ch: usize| -> f32 {
        if x < 0 || y < 0 || x >= w || y >= h {
            fill[ch] as f32
        } else {
            src.get_pixel(x as u32, y as u32).0[ch] as f32
        }
    };
    for (x, y, p) in img.enumerate_pixels_mut() {
        // Pixel centres, as PIL samples them.
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        let sx = a * px + b * py + c - 0.5;
        let sy = d * px + e * py + f - 0.5;
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        for ch in 0..3 {
            let top = at(x0, y0, ch) * (1.0 - fx) + at(x0 + 1, y0, ch) * fx;
            let bottom = at(x0, y0 + 1, ch) * (1.0 - fx) + at(x0 + 1, y0 + 1, ch) * fx;
            p.0[ch] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient() -> RgbImage {
        RgbImage::from_fn(16, 12, |x, y| Rgb([(x * 12 + 40) as u8, (y * 15 + 30) as u8, 90]))
    }

    #[test]
    fn zero_magnitude_geometry_and_unit_factors_change_nothing() {
        for op in [Op::Rotate, Op::ShearX, Op::ShearY, Op::TranslateX, Op::TranslateY, Op::Color, Op::Contrast, Op::Brightness, Op::Sharpness, Op::SolarizeAdd, Op::Solarize] {
            let mut img = gradient();
            apply_op(op, &mut img, 0.0, 1.0, [0, 0, 0]);
            assert_eq!(img, gradient(), "{op:?}");
        }
    }

    #[test]
    fn operations_do_what_they_say() {
        let mut img = gradient();
        apply_op(Op::Invert, &mut img, 0.5, 1.0, [0; 3]);
        assert_eq!(img.get_pixel(0, 0).0, [255 - 40, 255 - 30, 255 - 90]);

        let mut img = gradient();
        apply_op(Op::AutoContrast, &mut img, 0.5, 1.0, [0; 3]);
        assert_eq!(img.get_pixel(0, 0).0[0], 0);
        assert_eq!(img.get_pixel(15, 0).0[0], 255);

        // A full-width translation leaves only the fill.
        let mut img = gradient();
        apply_op(Op::TranslateX, &mut img, 1.0 / 0.45, 1.0, [7, 8, 9]);
        assert!(img.pixels().all(|p| p.0 == [7, 8, 9]));

        // A translation by 4 pixels shifts the content left by 4.
        let mut img = gradient();
        apply_op(Op::TranslateX, &mut img, 4.0 / (0.45 * 16.0), 1.0, [0; 3]);
        assert_eq!(img.get_pixel(0, 3), gradient().get_pixel(4, 3));

        let mut img = gradient();
        apply_op(Op::Brightness, &mut img, 1.0, -1.0, [0; 3]);
        assert_eq!(img.get_pixel(5, 5).0, [(gradient().get_pixel(5, 5).0[0] as f32 * 0.1).round() as u8, 11, 9]);

        let mut img = gradient();
        apply_op(Op::Posterize, &mut img, 0.0, 1.0, [0; 3]);
        assert!(img.iter().all(|v| v % 16 == 0), "4 bits dropped at level 0");
        apply_op(Op::Posterize, &mut img, 1.0, 1.0, [0; 3]);
        assert!(img.iter().all(|&v| v == 0), "no bit kept at the top level");
    }

    #[test]
    fn equalize_spreads_a_narrow_histogram() {
        let mut img = RgbImage::from_fn(64, 64, |x, y| Rgb([100 + ((x + y) % 8) as u8; 3]));
        equalize(&mut img);
        let (lo, hi) = img.pixels().fold((255, 0), |(lo, hi), p| (lo.min(p.0[0]), hi.max(p.0[0])));
        assert!(lo < 20 && hi > 200, "range {lo}..{hi}");
    }

    #[test]
    fn deterministic_for_a_seed_and_stronger_with_magnitude() {
        let run = |m: f32, seed| {
            let mut img = gradient();
            RandAugment { ops: 2, magnitude: m }.apply(&mut img, [0; 3], &mut rand::rngs::StdRng::seed_from_u64(seed));
            img
        };
        assert_eq!(run(9.0, 3), run(9.0, 3));
        let changed = (0..40).filter(|&s| run(9.0, s) != gradient()).count();
        assert!(changed > 20, "only {changed} of 40 images changed");
    }
}
