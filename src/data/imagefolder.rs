//! ImageNet's layout: `root/<split>/<class>/<image>.{JPEG,jpg,png}`; classes are the
//! sub-folder names, sorted, so `train/` and `val/` agree on label numbers.

use std::path::{Path, PathBuf};

use image::DynamicImage;
use walkdir::WalkDir;

use super::{DataError, Dataset, Split};

pub struct ImageFolder {
    files: Vec<(PathBuf, usize)>,
    classes: Vec<String>,
}

fn split_dir(root: &Path, split: Split) -> Result<PathBuf, DataError> {
    let name = match split {
        Split::Train => "train",
        Split::Val => "val",
    };
    let dir = root.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(DataError::file(&dir, format!("missing `{name}/` folder of the ImageFolder layout (root/{name}/<class>/<image>)")))
    }
}

/// Whether `path`'s extension is one an ImageFolder's images have.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpeg" | "jpg" | "png"))
}

impl ImageFolder {
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        // Classes come from train/ so both splits number them alike.
        let classes = Self::classes(&split_dir(root, Split::Train).or_else(|_| split_dir(root, split))?)?;
        let dir = split_dir(root, split)?;
        let mut files = Vec::new();
        // Symlinks are followed (ImageNet is often linked into place); walkdir reports a loop.
        for entry in WalkDir::new(&dir).min_depth(2).max_depth(2).follow_links(true).sort_by_file_name() {
            let path = match entry {
                Ok(entry) if entry.file_type().is_file() && is_image(entry.path()) => entry.into_path(),
                Ok(_) => continue,
                Err(e) if e.loop_ancestor().is_some() => continue, // a link to a folder above: no image
                // A link to nothing is an image that cannot be read: `on_bad_image` decides.
                Err(e) if dangling_image(&e).is_some() => dangling_image(&e).unwrap().to_path_buf(),
                Err(e) => return Err(DataError::file(&dir, e.to_string())),
            };
            let class = path.parent().and_then(|p| p.file_name()).unwrap().to_string_lossy();
            let label = classes.iter().position(|c| *c == class).ok_or_else(|| {
                DataError::file(&path, format!("class `{class}` is not a folder of train/"))
            })?;
            files.push((path, label));
        }
        if files.is_empty() {
            return Err(DataError::file(&dir, "holds no .JPEG, .jpg or .png images under <class>/ folders"));
        }
        Ok(Self { files, classes })
    }

    /// The class names of the ImageFolder at `root`, in label order, without listing images.
    pub fn class_names_at(root: &Path) -> Result<Vec<String>, DataError> {
        Self::classes(&split_dir(root, Split::Train).or_else(|_| split_dir(root, Split::Val))?)
    }

    fn classes(dir: &Path) -> Result<Vec<String>, DataError> {
        let mut classes: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| DataError::file(dir, e.to_string()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir()) // a symlinked class folder too
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(DataError::file(dir, "holds no class folders"));
        }
        Ok(classes)
    }

    /// Every image of both splits that exist, for the cache's dataset identity.
    /// Every image of both splits, for the dataset's identity; checks the layout on the way,
    /// so that a missing split, an empty class folder or a validation class that training
    /// does not have is an error before any stage runs.
    /// A link to nothing is an error here unless `skip_bad` (`on_bad_image = "skip"`): a dry run
    /// finds it, not the first epoch.
    pub fn index_files(root: &Path, skip_bad: bool) -> Result<Vec<PathBuf>, DataError> {
        let mut files = Vec::new();
        let train_classes = Self::classes(&split_dir(root, Split::Train)?)?;
        for split in [Split::Train, Split::Val] {
            let dir = split_dir(root, split)?;
            for class in Self::classes(&dir)? {
                if split == Split::Val && !train_classes.contains(&class) {
                    return Err(DataError::file(&dir.join(&class), format!("class `{class}` is not a folder of train/: the model would have no output for it")));
                }
                // An unreadable folder is not an empty one.
                std::fs::read_dir(dir.join(&class)).map_err(|e| DataError::file(&dir.join(&class), format!("cannot list this class folder: {e}")))?;
                let before = files.len();
                files.extend(
                    WalkDir::new(dir.join(&class))
                        .min_depth(1)
                        .max_depth(1)
                        .follow_links(true)
                        .sort_by_file_name()
                        .into_iter()
                        .filter_map(|e| match e {
                            Err(e) => dangling_image(&e).filter(|_| !skip_bad).map(|link| Err(link.to_path_buf())),
                            Ok(e) => (e.file_type().is_file() && is_image(e.path())).then(|| Ok(e.into_path())),
                        })
                        .collect::<Result<Vec<_>, PathBuf>>()
                        .map_err(|link| {
                            DataError::file(&link, "is a symbolic link to nothing: an image that cannot be read\n  hint: remove it, or set dataset.on_bad_image = \"skip\"")
                        })?,
                );
                if files.len() == before {
                    return Err(DataError::file(&dir.join(&class), "holds no .JPEG, .jpg or .png image: an empty class folder\n  hint: remove it, or add its images"));
                }
            }
        }
        Ok(files)
    }

    pub fn class_names(&self) -> &[String] {
        &self.classes
    }
}

/// The image a walk could not follow because it is a symbolic link to nothing.
fn dangling_image(e: &walkdir::Error) -> Option<&Path> {
    let missing = e.io_error().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
    e.path().filter(|p| missing && is_image(p))
}

/// Decodes the image at `path`, its format told by its bytes, not its name.
pub fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    // An image that cannot be opened (a link to nothing, no permission) is a bad image too.
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::BadImage { path: path.to_path_buf(), source: image::ImageError::IoError(e) })?
        .with_guessed_format()
        .map_err(|e| DataError::file(path, e.to_string()))?;
    reader.decode().map_err(|source| DataError::BadImage { path: path.to_path_buf(), source })
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn label(&self, index: usize) -> usize {
        self.files[index].1
    }
    fn image(&self, index: usize) -> Result<DynamicImage, DataError> {
        decode(&self.files[index].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tree(root: &Path) {
        for (split, n) in [("train", 3), ("val", 1)] {
            for (c, class) in ["cat", "ant", "bee"].iter().enumerate() {
                let dir = root.join(split).join(class);
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..n {
                    let img = image::RgbImage::from_pixel(8, 6, image::Rgb([c as u8 * 50, i as u8, 7]));
                    let ext = if i % 2 == 0 { "JPEG" } else { "png" };
                    img.save(dir.join(format!("{i}.{ext}"))).unwrap();
                }
            }
        }
        std::fs::write(root.join("train/ant/notes.txt"), "not an image").unwrap();
    }

    #[test]
    fn labels_follow_sorted_class_folders() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path());
        let train = ImageFolder::open(dir.path(), Split::Train).unwrap();
        assert_eq!(train.class_names(), ["ant", "bee", "cat"]);
        assert_eq!(train.len(), 9);
        assert_eq!(train.label(0), 0);
        assert_eq!(train.label(8), 2);
        let img = train.image(8).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (8, 6));
    }

    #[test]
    fn layout_problems_are_errors_naming_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path());
        assert_eq!(ImageFolder::index_files(dir.path(), false).unwrap().len(), 12);
        std::fs::create_dir_all(dir.path().join("train/dog")).unwrap();
        let err = ImageFolder::index_files(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("train/dog") && err.contains("an empty class folder"), "{err}");
        std::fs::remove_dir(dir.path().join("train/dog")).unwrap();
        std::fs::rename(dir.path().join("val/bee"), dir.path().join("val/bees")).unwrap();
        let err = ImageFolder::index_files(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("val/bees") && err.contains("class `bees` is not a folder of train/"), "{err}");
        std::fs::remove_dir_all(dir.path().join("val")).unwrap();
        let err = ImageFolder::index_files(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("missing `val/` folder"), "{err}");
    }

    #[test]
    fn symlinked_class_folders_and_images_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        write_tree(elsewhere.path());
        for split in ["train", "val"] {
            std::fs::create_dir_all(dir.path().join(split).join("ant")).unwrap();
            std::os::unix::fs::symlink(elsewhere.path().join(split).join("cat"), dir.path().join(split).join("cat")).unwrap();
            for image in std::fs::read_dir(elsewhere.path().join(split).join("ant")).unwrap() {
                let image = image.unwrap().path();
                std::os::unix::fs::symlink(&image, dir.path().join(split).join("ant").join(image.file_name().unwrap())).unwrap();
            }
        }
        // A link back up makes a loop, which stays two levels deep: not walked into.
        std::os::unix::fs::symlink(dir.path().join("train"), dir.path().join("train/cat/loop")).ok();
        let train = ImageFolder::open(dir.path(), Split::Train).unwrap();
        assert_eq!(train.class_names(), ["ant", "cat"]);
        assert_eq!(train.len(), 6, "3 linked images of ant and the 3 of the linked cat folder");
        assert_eq!(ImageFolder::index_files(dir.path(), false).unwrap().len(), 8);
        // The audit's link to nothing passed a dry run and failed the first epoch.
        let dangling = dir.path().join("train/ant/gone.png");
        std::os::unix::fs::symlink(dir.path().join("nowhere.png"), &dangling).unwrap();
        let err = ImageFolder::index_files(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("gone.png") && err.contains("symbolic link to nothing") && err.contains("on_bad_image"), "{err}");
        assert_eq!(ImageFolder::index_files(dir.path(), true).unwrap().len(), 8, "skipped, as training skips it");
    }

    #[test]
    fn corrupt_image_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path());
        let bad = dir.path().join("val/bee/0.JPEG");
        std::fs::write(&bad, b"\xff\xd8\xff garbage").unwrap();
        let val = ImageFolder::open(dir.path(), Split::Val).unwrap();
        let err = (0..val.len()).find_map(|i| val.image(i).err()).unwrap().to_string();
        assert!(err.contains("val/bee/0.JPEG"), "{err}");
        assert!(err.contains("on_bad_image"), "{err}");
    }
}
