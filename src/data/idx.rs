//! MNIST-style IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`, ...),
//! held in memory: Fashion-MNIST is 47 MB decoded.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage};

use super::{DataError, Dataset, Split};

pub struct IdxDataset {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    num_classes: usize,
}

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

fn stem(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Val => "t10k",
    }
}

/// `name` or `name.gz`, whichever exists.
fn find(root: &Path, name: &str) -> Result<PathBuf, DataError> {
    let raw = root.join(name);
    let gz = root.join(format!("{name}.gz"));
    if gz.exists() {
        Ok(gz)
    } else if raw.exists() {
        Ok(raw)
    } else {
        Err(DataError::file(&raw, "missing IDX file (looked for it with and without .gz)"))
    }
}

/// The most an IDX file may hold once inflated (MNIST's training images are 47 MB).
const MAX_IDX_BYTES: u64 = 1 << 32;

fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = crate::files::read_limited(path, MAX_IDX_BYTES).map_err(|e| DataError::file(path, e.to_string()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        // Bounded: a small .gz may inflate without end.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::file(path, format!("corrupt gzip: {e}")))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(DataError::file(path, format!("inflates to more than {MAX_IDX_BYTES} bytes: not an IDX file of images")));
        }
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Checks the header and returns the dimensions and the payload.
fn parse(path: &Path, bytes: &[u8], magic: u32, ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(DataError::file(path, "truncated IDX header"));
    }
    let word = |i: usize| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if word(0) != magic {
        return Err(DataError::file(path, format!("bad IDX magic {:#010x}, expected {magic:#010x}", word(0))));
    }
    let dims: Vec<usize> = (1..=ndim).map(|i| word(i) as usize).collect();
    if dims[1..].contains(&0) {
        return Err(DataError::file(path, format!("header gives images of {dims:?}: an empty dimension")));
    }
    let expected = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d)).unwrap_or(usize::MAX);
    let payload = &bytes[header..];
    if payload.len() != expected {
        return Err(DataError::file(
            path,
            format!("header promises {expected} bytes of data ({dims:?}), file holds {}", payload.len()),
        ));
    }
    Ok((dims, payload.to_vec()))
}

impl IdxDataset {
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let images = find(root, &format!("{}-images-idx3-ubyte", stem(split)))?;
        let labels = find(root, &format!("{}-labels-idx1-ubyte", stem(split)))?;
        let (dims, pixels) = parse(&images, &read_all(&images)?, IMAGES_MAGIC, 3)?;
        let (ldims, labels_data) = parse(&labels, &read_all(&labels)?, LABELS_MAGIC, 1)?;
        if dims[0] == 0 {
            return Err(DataError::file(&images, "holds no images (its header gives 0)"));
        }
        if ldims[0] != dims[0] {
            return Err(DataError::file(
                &labels,
                format!("holds {} labels but {} holds {} images", ldims[0], images.display(), dims[0]),
            ));
        }
        let num_classes = labels_data.iter().copied().max().map_or(0, |m| m as usize + 1);
        if split == Split::Train {
            check_classes(&labels, &labels_data, num_classes)?;
        }
        Ok(Self { pixels, labels: labels_data, rows: dims[1], cols: dims[2], num_classes })
    }

    /// The files both splits read, for the cache's dataset identity.
    pub fn files(root: &Path) -> Result<Vec<PathBuf>, DataError> {
        let mut files = Vec::new();
        for split in [Split::Train, Split::Val] {
            for kind in ["images-idx3", "labels-idx1"] {
                files.push(find(root, &format!("{}-{kind}-ubyte", stem(split)))?);
            }
        }
        Ok(files)
    }
}

/// Refuses training labels that leave a class below the largest without an example: the class
/// count is the largest label plus one, so one damaged byte (200 among 0 to 9) would silently
/// make a model of 201 classes.
fn check_classes(path: &Path, labels: &[u8], num_classes: usize) -> Result<(), DataError> {
    let mut seen = vec![false; num_classes];
    for &l in labels {
        seen[l as usize] = true;
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        let largest = num_classes - 1;
        let at = labels.iter().position(|&l| l as usize == largest).unwrap_or(0);
        return Err(DataError::file(
            path,
            format!(
                "label {largest} (example {at}) makes {num_classes} classes, but class {missing} has no example ({} of {num_classes} classes have none): a damaged label?",
                seen.iter().filter(|s| !**s).count()
            ),
        ));
    }
    Ok(())
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, index: usize) -> usize {
        self.labels[index] as usize
    }
    fn image(&self, index: usize) -> Result<DynamicImage, DataError> {
        let size = self.rows * self.cols;
        let data = self.pixels[index * size..(index + 1) * size].to_vec();
        let img = GrayImage::from_raw(self.cols as u32, self.rows as u32, data)
            .expect("buffer size checked at open");
        Ok(DynamicImage::ImageLuma8(img))
    }
}

/// Writes an IDX pair, for tests and fixtures.
pub fn write_idx(dir: &Path, prefix: &str, images: &[Vec<u8>], rows: usize, cols: usize, labels: &[u8]) -> std::io::Result<()> {
    let mut img = Vec::new();
    img.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    for d in [images.len(), rows, cols] {
        img.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for i in images {
        img.extend_from_slice(i);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img)?;
    let mut lab = Vec::new();
    lab.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    lab.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    lab.extend_from_slice(labels);
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_raw_and_gzipped_files() {
        let dir = tempfile::tempdir().unwrap();
        let images: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8 * 10; 4 * 5]).collect();
        let labels = [0u8, 1, 2, 0, 1, 2];
        write_idx(dir.path(), "train", &images, 4, 5, &labels).unwrap();
        // The val split is gzipped, as Debian ships it.
        write_idx(dir.path(), "t10k", &images[..3], 4, 5, &labels[..3]).unwrap();
        for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
            let raw = std::fs::read(dir.path().join(name)).unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&raw).unwrap();
            std::fs::write(dir.path().join(format!("{name}.gz")), gz.finish().unwrap()).unwrap();
            std::fs::remove_file(dir.path().join(name)).unwrap();
        }
        let train = IdxDataset::open(dir.path(), Split::Train).unwrap();
        assert_eq!((train.len(), train.num_classes()), (6, 3));
        assert_eq!(train.label(4), 1);
        let img = train.image(3).unwrap().to_luma8();
        assert_eq!((img.width(), img.height()), (5, 4));
        assert!(img.pixels().all(|p| p.0[0] == 30));
        let val = IdxDataset::open(dir.path(), Split::Val).unwrap();
        assert_eq!(val.len(), 3);
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_idx(dir.path(), "train", &[vec![0; 4]], 2, 2, &[0]).unwrap();
        let path = dir.path().join("train-images-idx3-ubyte");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = IdxDataset::open(dir.path(), Split::Train).err().unwrap().to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
        assert!(err.contains("header promises 4 bytes"), "{err}");
    }

    #[test]
    fn a_label_that_leaves_classes_without_examples_is_named() {
        let dir = tempfile::tempdir().unwrap();
        // The audit's case: one byte of 200 among labels 0 to 9.
        let mut labels: Vec<u8> = (0..200).map(|i| (i % 10) as u8).collect();
        labels[57] = 200;
        write_idx(dir.path(), "train", &vec![vec![0; 4]; 200], 2, 2, &labels).unwrap();
        let err = IdxDataset::open(dir.path(), Split::Train).err().unwrap().to_string();
        assert!(err.contains("train-labels-idx1-ubyte: label 200 (example 57) makes 201 classes, but class 10 has no example (190 of 201"), "{err}");
        write_idx(dir.path(), "t10k", &[], 2, 2, &[]).unwrap();
        let err = IdxDataset::open(dir.path(), Split::Val).err().unwrap().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte: holds no images"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = IdxDataset::open(dir.path(), Split::Val).err().unwrap().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte: missing IDX file"), "{err}");
    }
}
