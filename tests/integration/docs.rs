//! The README, the changelog, the GPU check's guide and every page of docs/ say only what resolves: each relative link
//! names a file (and a heading, after `#`) that exists, and each `runner ...` command they quote
//! parses as the CLI does. A full command line in a `sh` block must parse whole, its pipeline
//! and sweep files must exist, and a pipeline with its `--with` and `--set` must load (over
//! the smoke profile, so that no dataset or checkpoint is needed); an inline `runner ...` may
//! hold placeholders, so only its subcommand and flags are checked. The prune keys listed in
//! docs/pruning.md are `runner stages`'s. No network, no Python.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use nvit::cli::{BenchCommand, Cli, Command};
use nvit::config::Overrides;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, CHANGELOG.md, results/gpu/README.md (the GPU check's guide) and docs/*.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md"), repo().join("CHANGELOG.md"), repo().join("results/gpu/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "md")).collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading.trim().to_lowercase().chars().filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_').map(|c| if c == ' ' { '-' } else { c }).collect()
}

fn anchors(text: &str) -> Vec<String> {
    text.lines().filter(|l| l.starts_with('#')).map(|l| anchor(l.trim_start_matches('#'))).collect()
}

/// The text outside fenced blocks, and the lines of each `sh` block.
fn split(text: &str) -> (String, Vec<String>) {
    let (mut prose, mut sh) = (String::new(), Vec::new());
    let mut fence: Option<String> = None;
    for line in text.lines() {
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            fence = if fence.is_some() { None } else { Some(lang.trim().to_string()) };
            continue;
        }
        match &fence {
            None => {
                prose.push_str(line);
                prose.push('\n');
            }
            Some(lang) if lang == "sh" => sh.push(line.to_string()),
            Some(_) => {}
        }
    }
    (prose, sh)
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let (prose, _) = split(&text);
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            rest = &rest[end..];
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, heading) = target.split_once('#').map_or((target, None), |(f, h)| (f, Some(h)));
            let path = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            if !path.exists() {
                broken.push(format!("{}: `{target}`: no such file", page.display()));
            } else if let Some(h) = heading {
                if path.is_file() && !anchors(&std::fs::read_to_string(&path).unwrap_or_default()).iter().any(|a| a == h) {
                    broken.push(format!("{}: `{target}`: no heading `#{h}` there", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Shell words: quotes and backslashes as sh reads them, no expansion.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut word, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                word.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// The `runner` command of a shell line (joined with its continuations), if it has one: the
/// words from `runner` (after any `VAR=value`) up to a comment, redirection, pipe or `&&`.
fn runner_command(line: &str) -> Option<Vec<String>> {
    let line = line.split(" #").next().unwrap();
    let w = words(line);
    let start = w.iter().position(|x| !x.contains('=') || x.starts_with('-'))?;
    if w[start] != "runner" {
        return None;
    }
    Some(w[start..].iter().take_while(|x| !(x.starts_with('>') || x.starts_with('#') || ["|", "&&", ";", "2>&1"].contains(&x.as_str()))).cloned().collect())
}

fn exists(path: &Path, what: &str, problems: &mut Vec<String>) {
    if !repo().join(path).exists() {
        problems.push(format!("{what} `{}` does not exist", path.display()));
    }
}

/// What a parsed command names must be there, and its pipeline must load.
fn check(cli: Cli) -> Vec<String> {
    let mut p = Vec::new();
    // As written, or where its data is not here (ImageNet, Fashion-MNIST outside CI) over the
    // smoke profile (the paper's pipelines) or on synthetic images. `--backend` and
    // `--devices` are left out: this build may lack the backend a command names.
    let load = |pipeline: &Path, with: &[PathBuf], set: &[String], p: &mut Vec<String>| {
        exists(pipeline, "the pipeline", p);
        with.iter().for_each(|w| exists(w, "the --with file", p));
        if p.is_empty() {
            let with: Vec<PathBuf> = with.iter().map(|w| repo().join(w)).collect();
            let smoke = with.iter().cloned().chain([repo().join("pipelines/smoke.toml")]).collect();
            let synthetic = set.iter().cloned().chain(["dataset.kind=\"synthetic\"".to_string()]).collect();
            let attempts = [Overrides { with: with.clone(), set: set.to_vec(), env: false }, Overrides { with: smoke, set: set.to_vec(), env: false }, Overrides { with, set: synthetic, env: false }];
            let errors: Vec<String> = attempts.iter().map_while(|o| nvit::config::load(&repo().join(pipeline), o).err().map(|e| e.to_string())).collect();
            if errors.len() == attempts.len() {
                p.push(format!("does not load: {}", errors[0]));
            }
        }
    };
    match cli.command {
        Command::Run { pipeline, with, set, .. } => load(&pipeline, &with, &set, &mut p),
        Command::Show { pipeline, with, set } | Command::Export { pipeline, with, set, .. } | Command::Predict { pipeline, with, set, .. } => load(&pipeline, &with, &set, &mut p),
        Command::Sweep { sweep, with, .. } => {
            exists(&sweep, "the sweep", &mut p);
            with.iter().for_each(|w| exists(w, "the --with file", &mut p));
        }
        Command::Bench { command: BenchCommand::Onnxruntime { pair, .. } } => {
            pair.iter().filter(|s| s.ends_with(".toml") || s.ends_with(".json")).for_each(|s| exists(Path::new(s), "the model", &mut p));
        }
        _ => {}
    }
    p
}

/// An inline `runner ...`: its subcommands exist and each `--flag` is one of the last's.
fn check_inline(words: &[String]) -> Option<String> {
    let mut cmd = Cli::command();
    let mut path = vec!["runner".to_string()];
    for w in &words[1..] {
        if w.starts_with('-') {
            let flag = w.trim_start_matches('-').split('=').next().unwrap();
            if flag != "help" && !cmd.get_arguments().any(|a| a.get_long() == Some(flag)) {
                return Some(format!("`{}` has no flag --{flag}", path.join(" ")));
            }
        } else if let Some(sub) = cmd.find_subcommand(w).cloned() {
            path.push(w.clone());
            cmd = sub;
        } else if cmd.has_subcommands() {
            return Some(format!("`{}` has no subcommand `{w}`", path.join(" ")));
        }
    }
    None
}

#[test]
fn every_runner_command_parses_and_names_what_exists() {
    let mut problems = Vec::new();
    let mut full = 0;
    // The changelog quotes commands as they were then.
    for page in pages().into_iter().filter(|p| !p.ends_with("CHANGELOG.md")) {
        let text = std::fs::read_to_string(&page).unwrap();
        let (prose, sh) = split(&text);
        // Lines ending in a backslash continue.
        let mut lines = Vec::new();
        let mut acc = String::new();
        for l in sh {
            if let Some(head) = l.trim_end().strip_suffix('\\') {
                acc.push_str(head);
                acc.push(' ');
            } else {
                acc.push_str(&l);
                lines.push(std::mem::take(&mut acc));
            }
        }
        for line in lines {
            let Some(args) = runner_command(&line) else { continue };
            full += 1;
            match Cli::try_parse_from(&args) {
                Ok(cli) => problems.extend(check(cli).into_iter().map(|e| format!("{}: `{line}`: {e}", page.display()))),
                Err(e) => problems.push(format!("{}: `{line}`: {}", page.display(), e.render())),
            }
        }
        for span in prose.split('`').skip(1).step_by(2).filter(|s| s.starts_with("runner ")) {
            if let Some(e) = check_inline(&words(span)) {
                problems.push(format!("{}: `{span}`: {e}", page.display()));
            }
        }
    }
    assert!(full >= 30, "only {full} command lines found");
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn the_prune_keys_in_docs_are_runner_stages() {
    let stages = nvit::commands::stages();
    let prune: Vec<&str> = stages.lines().skip_while(|l| !l.starts_with("prune:")).take_while(|l| !l.starts_with("distill:")).filter(|l| !l.trim().is_empty()).collect();
    assert!(prune.len() > 20, "{stages}");
    let page = std::fs::read_to_string(repo().join("docs/pruning.md")).unwrap();
    let missing: Vec<&&str> = prune.iter().filter(|l| !page.contains(**l)).collect();
    assert!(missing.is_empty(), "docs/pruning.md lacks these lines of `runner stages` (paste its prune section):\n{}", missing.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n"));
}

/// The README's first command, with stand-ins for `apt-get`, `cargo` and `sudo` that only say
/// how they were called: as root it installs without `sudo` (which Debian's and Ubuntu's root
/// images lack: the audit's failure), as a user through it.
#[test]
fn the_readmes_first_command_works_as_root_and_as_a_user() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let first = readme.lines().skip_while(|l| !l.starts_with("```sh")).nth(2).unwrap();
    assert!(first.contains("apt-get install -y dataset-fashion-mnist") && first.contains("cargo run --release -- run pipelines/quickstart.toml"), "{first}");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    for tool in ["apt-get", "cargo", "sudo"] {
        let stub = dir.path().join(tool);
        std::fs::write(&stub, format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n[ {tool} != sudo ] || exec \"$@\"\n", log.display())).unwrap();
        std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    let status = std::process::Command::new("bash").args(["-c", first]).env("PATH", &path).status().unwrap();
    assert!(status.success());
    let calls = std::fs::read_to_string(&log).unwrap();
    let root = String::from_utf8(std::process::Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim() == "0";
    let sudo = if root { "" } else { "sudo apt-get update\n" };
    assert!(calls.starts_with(&format!("{sudo}apt-get update\n")), "{calls}");
    assert!(calls.contains("apt-get install -y dataset-fashion-mnist\n") && calls.ends_with("cargo run --release -- run pipelines/quickstart.toml\n"), "{calls}");
    assert_eq!(calls.contains("sudo"), !root, "{calls}");
}
