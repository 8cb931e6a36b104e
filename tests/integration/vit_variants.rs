//! timm's other VisionTransformers: `tests/fixtures/make_timm_vit_fixtures.py` wrote, per
//! variant that changes the graph (AugReg ViT, DeiT III's LayerScale and patches-only
//! positions, DINOv2's registers, average pooling with `fc_norm` and no class token, a DINOv2
//! read at other image sizes), a random timm model (32 px, patch 8, width 48, depth 2, 3 heads),
//! inputs, timm's logits and its parameter count. Each is read, matched with timm's logits,
//! written back tensor for tensor, pruned (masked equals compact), and run in tract from ONNX;
//! python/nvit.py's logits on each, which the script saved, are timm's.

use crate::common;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use nvit::model::checkpoint::{self, StateDict};
use nvit::model::{Model, ModelConfig, ModelSection, Pool, Vit, VitConfig};
use nvit::prune::{Masks, ParamSet, Structure};

fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm_vit").join(variant)
}

/// What `[model]` says of every fixture: 3 heads, 10 classes; the rest is the checkpoint's.
fn hint() -> ModelConfig {
    ModelSection { heads: Some(3), ..Default::default() }.resolve(10).unwrap()
}

fn load(variant: &str, image_size: Option<usize>) -> Vit<NdArray> {
    let path = fixture(variant).join("model.safetensors");
    match checkpoint::load_pretrained_at::<NdArray>(&path, &hint(), image_size, &Default::default()).unwrap().model {
        Model::Deit(m) => m,
        Model::Swin(_) => panic!("a ViT"),
    }
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The model's logits on the fixture's input at `size` px against timm's.
fn assert_matches_timm(model: &Vit<NdArray>, variant: &str, size: usize) {
    let io = StateDict::read(&fixture(variant).join("io.safetensors")).unwrap();
    let (shape, input) = &io.tensors[&format!("input_{size}")];
    let x = Tensor::<NdArray, 4>::from_data(TensorData::new(input.clone(), shape.clone()), &Default::default());
    let ours = model.forward(x).logits().into_data().to_vec::<f32>().unwrap();
    let timm = &io.tensors[&format!("logits_{size}")].1;
    let scale = timm.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(worst(&ours, timm) < 1e-4, "{variant} at {size} px: max |ours - timm| = {} (logits up to {scale})", worst(&ours, timm));
    assert!(scale > 0.1, "{variant}: the fixture's logits are not trivially small");
}

fn timm_params(variant: &str, size: usize) -> usize {
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture(variant).join("meta.json")).unwrap()).unwrap();
    meta["params"][size.to_string()].as_u64().unwrap() as usize
}

#[test]
fn each_variant_reads_its_options_from_the_checkpoint_and_computes_timms_logits() {
    let _rng = common::rng_turn();
    // (variant, class token, registers, LayerScale, qkv bias, pooling, fc_norm, patches-only positions)
    let cases = [
        ("vit", true, 0, false, true, Pool::Token, false, false),
        ("deit3", true, 0, true, true, Pool::Token, false, true),
        ("dinov2-reg4", true, 4, true, true, Pool::Token, false, true),
        ("avg-no-cls", false, 0, false, false, Pool::Avg, true, false),
    ];
    for (variant, class_token, reg_tokens, layer_scale, qkv_bias, pool, fc_norm, no_embed_class) in cases {
        let model = load(variant, None);
        let c = &model.config;
        let got = (c.class_token, c.reg_tokens, c.init_values.is_some(), c.qkv_bias, c.global_pool, c.fc_norm, c.no_embed_class);
        assert_eq!(got, (class_token, reg_tokens, layer_scale, qkv_bias, pool, fc_norm, no_embed_class), "{variant}");
        assert_eq!((c.image_size, c.patch_size, c.embed_dim, c.depth(), c.num_classes), (32, 8, 48, 2, 10), "{variant}");
        assert_matches_timm(&model, variant, 32);
        assert_eq!(c.params(), timm_params(variant, 32), "{variant}: parameters as timm counts them");
        // Out again in timm's naming, tensor for tensor what timm wrote.
        let sd = StateDict::read(&fixture(variant).join("model.safetensors")).unwrap();
        assert_eq!(checkpoint::export(&model), sd, "{variant}");
        // python/nvit.py, built from the runner's dims and timm's tensors, computed timm's too.
        let io = StateDict::read(&fixture(variant).join("io.safetensors")).unwrap();
        let py = worst(&io.tensors["nvit_py_logits_32"].1, &io.tensors["logits_32"].1);
        assert!(py < 1e-4, "{variant}: max |nvit.py - timm| = {py}");
    }
}

/// A DINOv2 made for 48 px read at 32 and at 64 px: the position embedding resampled as
/// timm's checkpoint filter does it (bicubic, antialiased when shrinking) gives timm's logits.
#[test]
fn a_position_embedding_resampled_to_another_image_size_gives_timms_logits() {
    let _rng = common::rng_turn();
    let native = load("dinov2-resized", None);
    assert_eq!(native.config.image_size, 48, "the size the checkpoint was made for");
    for size in [32, 64] {
        let model = load("dinov2-resized", Some(size));
        assert_eq!(model.config.image_size, size);
        assert_matches_timm(&model, "dinov2-resized", size);
        assert_eq!(model.config.params(), timm_params("dinov2-resized", size));
    }
    let path = fixture("dinov2-resized").join("model.safetensors");
    let err = checkpoint::load_pretrained_at::<NdArray>(&path, &hint(), Some(36), &Default::default()).err().unwrap();
    assert!(format!("{err:#}").contains("image_size 36 is not a multiple of the checkpoint's patch size 8"), "{err:#}");
}

/// Pruning every structure of each variant, embedding channels included (which LayerScale's
/// gains, the register tokens and `fc_norm` span): the compact model computes what the masked
/// one computes, and runs in tract from ONNX as in the runner.
#[test]
fn each_variant_pruned_compacts_to_what_its_masks_compute_and_exports_to_onnx() {
    let _rng = common::rng_turn();
    let device = Default::default();
    for variant in ["vit", "deit3", "dinov2-reg4", "avg-no-cls"] {
        let model = Model::Deit(load(variant, None));
        let config = model.config();
        let mut masks = Masks::ones(&config);
        for (s, b, units) in [(Structure::Emb, 0, vec![0, 5, 47]), (Structure::Head, 1, vec![2]), (Structure::Qk, 0, vec![3]), (Structure::V, 1, vec![0, 9]), (Structure::Mlp, 0, vec![1, 100])] {
            for u in units {
                masks.get_mut(s, b)[u] = 0.0;
            }
        }
        let x = Tensor::<NdArray, 4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
        let masked = masks.apply(model.clone(), ParamSet::Pruned).forward(x.clone()).logits().into_data().to_vec::<f32>().unwrap();
        let compact = nvit::prune::compact(&model, &masks, &device).unwrap();
        let small = compact.forward(x).logits().into_data().to_vec::<f32>().unwrap();
        assert!(worst(&masked, &small) < 1e-5, "{variant}: max |masked - compact| = {}", worst(&masked, &small));
        let ModelConfig::Deit(c) = compact.config() else { panic!("a ViT") };
        assert_eq!((c.embed_dim, c.blocks[1].heads, c.blocks[0].qk, c.blocks[1].v, c.blocks[0].mlp), (45, 2, 15, 14, 190), "{variant}");
        let Model::Deit(small) = compact else { panic!("a ViT") };
        assert_runs_in_tract(&small, variant);
    }
}

fn assert_runs_in_tract(model: &Vit<NdArray>, variant: &str) {
    use tract_onnx::prelude::*;
    let spec = nvit::export::InputSpec { mean: vec![0.5; 3], std: vec![0.25; 3], classes: None };
    let bytes = nvit::export::onnx::to_onnx(model, &spec);
    let graph = tract_onnx::onnx().model_for_read(&mut bytes.as_slice()).unwrap();
    let runnable = graph.into_optimized().unwrap().into_runnable().unwrap();
    let shape = [2, 3, 32, 32];
    let values: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
    let x = tract_ndarray::Array4::from_shape_vec(shape, values.clone()).unwrap();
    let out = runnable.run(tvec!(tract_onnx::prelude::Tensor::from(x).into())).unwrap();
    let theirs: Vec<f32> = out[0].to_array_view::<f32>().unwrap().iter().copied().collect();
    let x = burn::tensor::Tensor::<NdArray, 4>::from_data(TensorData::new(values, shape), &Default::default());
    let ours = model.forward(x).logits().into_data().to_vec::<f32>().unwrap();
    assert!(worst(&ours, &theirs) < 1e-4, "{variant}: max |runner - onnx| = {}", worst(&ours, &theirs));
}

#[test]
fn presets_name_timms_models_and_model_keys_override_them() {
    let deit3 = VitConfig::preset("deit3-small").unwrap();
    assert_eq!((deit3.embed_dim, deit3.init_values, deit3.no_embed_class, deit3.params()), (384, Some(1e-6), true, 22_059_496));
    let dino = VitConfig::preset("vit-small-patch14-reg4-dinov2").unwrap();
    assert_eq!((dino.image_size, dino.patch_size, dino.reg_tokens, dino.num_tokens()), (518, 14, 4, 37 * 37 + 5));
    assert_eq!(dino.params(), 22_442_344, "timm's, with a 1000-class head");
    // fvcore 0.1.5 on timm 1.0.31 (unfused attention, 1000 classes) counts 4,608,338,304 and
    // 46,949,164,800 FLOPs, LayerNorm at 5 per element, which this count leaves out.
    let norms = |c: &VitConfig| 5 * c.embed_dim * c.num_tokens() * (2 * c.depth() + 1);
    assert_eq!(deit3.flops() + norms(&deit3), 4_608_338_304);
    assert_eq!(dino.flops() + norms(&dino), 46_949_164_800);
    assert!(VitConfig::PRESETS.iter().all(|p| VitConfig::preset(p).unwrap().check().is_empty()));
    let section = ModelSection { preset: Some("vit-small-patch16-224".into()), global_pool: Some(Pool::Avg), class_token: Some(false), ..Default::default() };
    let ModelConfig::Deit(c) = section.resolve(10).unwrap() else { panic!("a ViT") };
    assert_eq!((c.global_pool, c.fc_norm, c.class_token, c.num_tokens()), (Pool::Avg, true, false, 196));
    let vit: ModelSection = toml::from_str("family = \"vit\"\npreset = \"deit3-small\"").unwrap();
    assert_eq!(vit.family(), nvit::model::Family::Deit, "`vit` names the family DeiT is one configuration of");
    assert!(vit.validate().is_empty(), "{:?}", vit.validate());
    let bad = ModelSection { class_token: Some(false), global_pool: Some(Pool::Token), ..Default::default() };
    assert!(bad.validate().iter().any(|(k, m)| k == "global_pool" && m.contains("no token to read")), "{:?}", bad.validate());
}

/// A pipeline reading `variant`'s checkpoint through every stage kind, `model_keys` in [model].
fn variant_pipeline(dir: &Path, variant: &str, model_keys: &str) -> PathBuf {
    let d = dir.display();
    let checkpoint = fixture(variant).join("model.safetensors");
    let pipeline = format!(
        r#"
[pipeline]
name = "variant"
results_dir = "{d}/results"
runs_dir = "{d}/runs"

[dataset]
kind = "synthetic"
classes = 10
train_size = 32
val_size = 16
synthetic_size = 32
workers = 1

[model]
heads = 3
{model_keys}

[stages.load]
kind = "load_pretrained"
path = "{checkpoint}"

[stages.latency]
kind = "profile_latency"
input = "load"
grid = "coarse"
batch_size = 2
warmup = 0
repeats = 1
rounds = 1

[stages.prune]
kind = "prune"
input = "load"
latency = "latency"
latency_target = 0.8
interval = 1
max_prune_steps = 2
groups_per_step = 2
group_emb = 2
group_qk = 1
group_v = 1
group_mlp = 8
batch_size = 8
kd_weight = 1.0

[stages.distill]
kind = "distill"
teacher = "load"
epochs = 1
steps_per_epoch = 2
batch_size = 8
warmup_epochs = 0

[stages.evaluate]
kind = "evaluate"
batch_size = 16
throughput_batch = 2
throughput_repeats = 1
warmup = 0
"#,
        checkpoint = checkpoint.display()
    );
    let path = dir.join("variant.toml");
    std::fs::write(&path, pipeline).unwrap();
    path
}

/// Each variant's checkpoint through the runner: read, latency profiled, pruned, fine-tuned
/// against itself, evaluated, exported to ONNX; the pruned model keeps the variant's options.
/// The DINOv2 made for 48 px runs at the 32 px `[model]` asks for.
#[test]
fn each_variant_runs_through_prune_distill_evaluate_and_export() {
    let cases = [
        ("deit3", "", "\"init_values\""),
        ("dinov2-reg4", "", "\"reg_tokens\": 4"),
        ("avg-no-cls", "", "\"global_pool\": \"avg\""),
        ("dinov2-resized", "image_size = 32", "\"image_size\": 32"),
    ];
    for (variant, model_keys, option) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = variant_pipeline(dir.path(), variant, model_keys);
        let path = path.to_str().unwrap();
        let (code, _, err) = common::output(common::runner(dir.path()).args(["run", path]));
        assert_eq!(code, 0, "{variant}: {err}");
        let out = dir.path().join("out");
        let (code, _, err) = common::output(common::runner(dir.path()).args(["export", path, "--stage", "distill", "--out", out.to_str().unwrap()]));
        assert_eq!(code, 0, "{variant}: {err}");
        let dims = std::fs::read_to_string(out.join("dims.json")).unwrap();
        assert!(dims.contains(option), "{variant}: {dims}");
        let pruned: VitConfig = serde_json::from_str(&dims).unwrap();
        assert!(pruned.params() < timm_params(variant, 32), "{variant}: pruned to {} params", pruned.params());
        let onnx = dir.path().join("model.onnx");
        let (code, _, err) = common::output(common::runner(dir.path()).args(["export", path, "--stage", "distill", "--format", "onnx", "--out", onnx.to_str().unwrap()]));
        assert_eq!(code, 0, "{variant}: {err}");
        assert!(std::fs::metadata(&onnx).unwrap().len() > 10_000, "{variant}");
    }
}

/// The audit's DINOv2 (patch 14) at 518 px without a preset was refused because the default
/// patch 16 does not divide 518. This checkpoint's patch is 8: at 40 px, which 16 does not
/// divide either, it loads, resampled, and evaluates; a size its own patch does not divide
/// is refused when it is read, naming the checkpoint's patch.
#[test]
fn without_a_patch_size_the_checkpoint_decides_what_image_size_must_divide() {
    for (size, ok) in [(40, true), (36, false)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let checkpoint = fixture("dinov2-resized").join("model.safetensors");
        let pipeline = format!(
            "[pipeline]\nname = \"dino\"\nresults_dir = \"{d}/results\"\nruns_dir = \"{d}/runs\"\n\
             [dataset]\nkind = \"synthetic\"\nclasses = 10\ntrain_size = 8\nval_size = 8\nsynthetic_size = {size}\nworkers = 1\n\
             [model]\nimage_size = {size}\n\
             [stages.load]\nkind = \"load_pretrained\"\npath = \"{}\"\n\
             [stages.evaluate]\nkind = \"evaluate\"\ninput = \"load\"\nbatch_size = 8\nthroughput_batch = 2\nthroughput_repeats = 1\nwarmup = 0\n",
            checkpoint.display()
        );
        let path = dir.path().join("dino.toml");
        std::fs::write(&path, pipeline).unwrap();
        let (code, _, err) = common::output(common::runner(dir.path()).args(["run", path.to_str().unwrap()]));
        if ok {
            assert_eq!(code, 0, "{err}");
            assert!(err.contains("position embedding resampled from 48 px (6x6 patches) to 40 px (5x5)"), "{err}");
        } else {
            assert!(code != 0 && err.contains("image_size 36 is not a multiple of the checkpoint's patch size 8"), "{err}");
        }
    }
}

/// Another image size is resampled, but not when [model] disagrees with the checkpoint on
/// anything else: the error names every disagreement, the image size among them.
#[test]
fn resampling_does_not_excuse_other_disagreements() {
    let dir = tempfile::tempdir().unwrap();
    let path = variant_pipeline(dir.path(), "dinov2-resized", "image_size = 32\nembed_dim = 24");
    let (code, _, err) = common::output(common::runner(dir.path()).args(["run", path.to_str().unwrap()]));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("the checkpoint disagrees with [model]") && err.contains("model.embed_dim") && err.contains("model.image_size"), "{err}");
    assert!(err.contains("stage `load` (load_pretrained) failed") && !err.contains("latency: running"), "the first stage stops the run: {err}");
}
