//! Mixup and CutMix, as DeiT trains with them (timm's `Mixup`, batch mode): each image is mixed
//! with its mirror in the batch (image `i` with image `n - 1 - i`) by one coefficient `lam`
//! drawn from Beta(alpha, alpha); with both enabled, CutMix is chosen half the time. The
//! labels become soft targets `lam * y_i + (1 - lam) * y_mirror`, label smoothing included.

use rand::Rng;
use rand_distr::{Beta, Distribution};

use super::Batch;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mixer {
    /// Beta parameter of Mixup; 0 disables it.
    pub mixup: f64,
    /// Beta parameter of CutMix; 0 disables it.
    pub cutmix: f64,
    pub label_smoothing: f64,
    pub classes: usize,
}

impl Mixer {
    /// Mixes the batch's images in place; returns its soft targets `[batch, classes]`.
    pub fn apply(&self, batch: &mut Batch, rng: &mut impl Rng) -> Vec<f32> {
        let use_cutmix = match (self.mixup > 0.0, self.cutmix > 0.0) {
            (false, false) => return soft_targets(&batch.labels, self.classes, self.label_smoothing, 1.0),
            (true, false) => false,
            (false, true) => true,
            (true, true) => rng.random_bool(0.5),
        };
        let alpha = if use_cutmix { self.cutmix } else { self.mixup };
        let mut lam = Beta::new(alpha, alpha).expect("a positive alpha").sample(rng) as f32;
        let [n, c, h, w] = batch.shape;
        let plane = h * w;
        let source = batch.images.clone();
        let image = |i: usize| &source[i * c * plane..(i + 1) * c * plane];
        if use_cutmix {
            let (y0, y1, x0, x1) = cutmix_box(h, w, lam, rng);
            for i in 0..n {
                let mirror = image(n - 1 - i);
                let dst = &mut batch.images[i * c * plane..(i + 1) * c * plane];
                for ch in 0..c {
                    for y in y0..y1 {
                        let row = ch * plane + y * w;
                        dst[row + x0..row + x1].copy_from_slice(&mirror[row + x0..row + x1]);
                    }
                }
            }
            // The coefficient is what the box leaves of the image, after clipping.
            lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f32 / plane as f32;
        } else {
            for i in 0..n {
                let (own, mirror) = (image(i), image(n - 1 - i));
                let dst = &mut batch.images[i * c * plane..(i + 1) * c * plane];
                for (d, (a, b)) in dst.iter_mut().zip(own.iter().zip(mirror)) {
                    *d = lam * a + (1.0 - lam) * b;
                }
            }
        }
        let own = soft_targets(&batch.labels, self.classes, self.label_smoothing, lam);
        let mirrored: Vec<i64> = batch.labels.iter().rev().copied().collect();
        let other = soft_targets(&mirrored, self.classes, self.label_smoothing, 1.0 - lam);
        own.iter().zip(&other).map(|(a, b)| a + b).collect()
    }
}

/// `weight` times the smoothed one-hot labels: `1 - s + s / classes` on the label,
/// `s / classes` elsewhere.
pub fn soft_targets(labels: &[i64], classes: usize, smoothing: f64, weight: f32) -> Vec<f32> {
    let off = (smoothing / classes as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut t = vec![off * weight; labels.len() * classes];
    for (i, &label) in labels.iter().enumerate() {
        t[i * classes + label as usize] = on * weight;
    }
    t
}

/// A box of about `1 - lam` of the image, centred uniformly and clipped to the image:
/// `(y0, y1, x0, x1)`.
fn cutmix_box(h: usize, w: usize, lam: f32, rng: &mut impl Rng) -> (usize, usize, usize, usize) {
    let cut = (1.0 - lam).sqrt();
    let (ch, cw) = ((h as f32 * cut) as i64, (w as f32 * cut) as i64);
    let (cy, cx) = (rng.random_range(0..h as i64), rng.random_range(0..w as i64));
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    (clip(cy - ch / 2, h), clip(cy + ch / 2, h), clip(cx - cw / 2, w), clip(cx + cw / 2, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Four 1-channel 4x4 images, image `i` filled with `i`.
    fn batch() -> Batch {
        let images = (0..4).flat_map(|i| vec![i as f32; 16]).collect();
        Batch { images, labels: vec![0, 1, 2, 3], shape: [4, 1, 4, 4] }
    }

    fn rows(t: &[f32], classes: usize) -> Vec<&[f32]> {
        t.chunks(classes).collect()
    }

    #[test]
    fn without_mixing_targets_are_smoothed_one_hot() {
        let mixer = Mixer { mixup: 0.0, cutmix: 0.0, label_smoothing: 0.1, classes: 5 };
        let mut b = batch();
        let t = mixer.apply(&mut b, &mut rand::rngs::StdRng::seed_from_u64(0));
        assert_eq!(b.images, batch().images);
        assert!((t[0] - 0.92).abs() < 1e-6 && (t[1] - 0.02).abs() < 1e-6);
        for row in rows(&t, 5) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn mixup_blends_each_image_with_its_mirror_and_the_targets_agree() {
        let mixer = Mixer { mixup: 0.8, cutmix: 0.0, label_smoothing: 0.0, classes: 4 };
        let mut b = batch();
        let t = mixer.apply(&mut b, &mut rand::rngs::StdRng::seed_from_u64(1));
        let lam = t[0]; // image 0's own label weight
        assert!(lam > 0.0 && lam < 1.0);
        // Image 0 = lam * 0 + (1 - lam) * 3.
        assert!((b.images[0] - (1.0 - lam) * 3.0).abs() < 1e-5);
        assert!((t[3] - (1.0 - lam)).abs() < 1e-6);
        for row in rows(&t, 4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn cutmix_pastes_a_box_whose_area_is_the_target_weight() {
        let mixer = Mixer { mixup: 0.0, cutmix: 1.0, label_smoothing: 0.0, classes: 4 };
        for seed in 0..20 {
            let mut b = batch();
            let t = mixer.apply(&mut b, &mut rand::rngs::StdRng::seed_from_u64(seed));
            let pasted = b.images[..16].iter().filter(|&&v| v == 3.0).count();
            assert!((t[3] - pasted as f32 / 16.0).abs() < 1e-6, "seed {seed}: {pasted} pixels, target {}", t[3]);
            assert!((t[0] + t[3] - 1.0).abs() < 1e-6);
        }
    }
}
