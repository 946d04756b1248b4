//! The seed plan's map cannot drift: `docs/plan-cases.tsv` (each case of the plan, its Rust
//! name, where it runs), `docs/test-plan.md` (the same map for a reader) and the tests in the
//! tree agree. A binary of its own, with no dependency, so that it builds in seconds
//! (`cargo test -p omerta-it --test plan`). It reads source files as text; it does not run the
//! tests it names.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where tests live.
const TREES: [&str; 7] = ["engine", "control", "mesh", "hv", "tools", "perf", "tests"];

/// The file whose table (`const SCENARIOS`) names every perf scenario `omerta-perf` runs.
const PERF_TABLE: &str = "perf/src/bin/omerta-perf/scenarios.rs";

/// One case of `docs/plan-cases.tsv`.
struct Case {
    seed: String,
    name: String,
    where_: String,
}

/// A function of the tree with the doc and attribute lines directly above it.
struct Func {
    path: String,
    name: String,
    test: bool,
    seeds: Vec<String>,
}

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(top().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn cases(tsv: &str) -> Vec<Case> {
    let mut out = Vec::new();
    for (n, line) in tsv.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let [seed, name, where_] = f[..] else { panic!("docs/plan-cases.tsv:{}: not three fields: {line}", n + 1) };
        out.push(Case { seed: seed.into(), name: name.into(), where_: where_.into() });
    }
    out
}

/// Every `.rs` file under `dir`, `target` directories left out.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The name of the function a line declares (`fn NAME(`, `pub fn NAME(`...), if it does.
fn declared(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let t = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub ")).unwrap_or(t);
    let rest = t.strip_prefix("fn ")?;
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    rest[end..].starts_with(['(', '<']).then(|| &rest[..end])
}

fn functions() -> Vec<Func> {
    let mut files = Vec::new();
    for t in TREES {
        rust_files(&top().join(t), &mut files);
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let path = f.strip_prefix(top()).unwrap_or(&f).to_string_lossy().into_owned();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(name) = declared(line) else { continue };
            // The doc and attribute lines directly above, nearest last.
            let mut above = Vec::new();
            for l in lines[..i].iter().rev() {
                let l = l.trim();
                if !(l.starts_with("///") || l.starts_with("#[")) {
                    break;
                }
                above.push(l);
            }
            out.push(Func {
                path: path.clone(),
                name: name.into(),
                test: above.iter().any(|l| l.starts_with("#[test]")),
                seeds: above.iter().filter_map(|l| l.strip_prefix("/// seed: ")).map(|s| s.trim().into()).collect(),
            });
        }
    }
    out
}

/// The map's rows in `docs/test-plan.md`: the seed case (first cell) and the row.
fn doc_rows(doc: &str) -> Vec<(String, String)> {
    doc.lines()
        .filter_map(|l| {
            let seed = l.strip_prefix("| `")?.split('`').next()?;
            Some((seed.to_string(), l.to_string()))
        })
        .collect()
}

/// Every `` `path::name` `` a row names.
fn row_tests(row: &str) -> BTreeSet<String> {
    row.split('`').skip(1).step_by(2).filter(|s| s.contains(".rs::")).map(String::from).collect()
}

/// The names in `omerta-perf`'s table of scenarios: every `name: "NAME"` between `const
/// SCENARIOS` and the `];` that closes it.
fn scenario_names(table: &str) -> BTreeSet<String> {
    let body = table.split("const SCENARIOS").nth(1).and_then(|t| t.split("\n];").next()).unwrap_or_default();
    body.split("name: \"").skip(1).filter_map(|s| s.split('"').next()).map(String::from).collect()
}

/// Everything wrong with the map, one line per problem, each naming its case.
fn problems(tsv: &str, doc: &str, funcs: &[Func], scenarios: &BTreeSet<String>) -> Vec<String> {
    let cases = cases(tsv);
    let rows = doc_rows(doc);
    let mut bad = Vec::new();
    for c in &cases {
        let seed = &c.seed;
        let row = rows.iter().find(|(s, _)| s == seed).map(|(_, r)| r.as_str());
        if row.is_none() {
            bad.push(format!("{seed}: no row in docs/test-plan.md"));
        }
        if c.where_.starts_with("perf") {
            if !scenarios.contains(&c.name) {
                bad.push(format!("{seed}: {PERF_TABLE} has no scenario `{}` in SCENARIOS", c.name));
            }
            if row.is_some_and(|r| !r.contains(&format!("scenario `{}`", c.name))) {
                bad.push(format!("{seed}: its row in docs/test-plan.md does not name scenario `{}`", c.name));
            }
            continue;
        }
        let tests: Vec<&Func> = funcs.iter().filter(|f| f.test && f.name == c.name).collect();
        if tests.is_empty() {
            bad.push(format!("{seed}: no #[test] fn {}( in {}/", c.name, TREES.join("/, ")));
            continue;
        }
        for t in &tests {
            if !t.seeds.contains(seed) {
                bad.push(format!("{seed}: {}::{} does not carry `/// seed: {seed}`", t.path, t.name));
            }
        }
        if c.where_.contains("real VM") && !tests.iter().any(|t| t.path == "tests/realvm.rs") {
            bad.push(format!("{seed}: a real-VM case, but fn {}( is not a test in tests/realvm.rs", c.name));
        }
        if let Some(row) = row {
            let want: BTreeSet<String> = tests.iter().map(|t| format!("{}::{}", t.path, t.name)).collect();
            let listed = row_tests(row);
            if listed != want {
                bad.push(format!("{seed}: docs/test-plan.md lists {listed:?}, the tree has {want:?}"));
            }
        }
    }
    // The other way round: no row and no seed line that the map does not know.
    for (seed, _) in &rows {
        if !cases.iter().any(|c| &c.seed == seed) {
            bad.push(format!("{seed}: a row of docs/test-plan.md that docs/plan-cases.tsv does not list"));
        }
    }
    for f in funcs {
        for s in &f.seeds {
            match cases.iter().find(|c| &c.seed == s) {
                None => bad.push(format!("{s}: {}::{} carries a seed line for no case of the map", f.path, f.name)),
                Some(c) if c.name != f.name => {
                    bad.push(format!("{s}: the seed line is on {}::{}, the map says fn {}(", f.path, f.name, c.name))
                }
                Some(_) => {}
            }
        }
    }
    bad
}

#[test]
fn every_plan_case_is_where_the_map_says() {
    let tsv = read("docs/plan-cases.tsv");
    assert!(cases(&tsv).len() >= 105, "docs/plan-cases.tsv lists every case of the seed plan");
    let bad = problems(&tsv, &read("docs/test-plan.md"), &functions(), &scenario_names(&read(PERF_TABLE)));
    assert!(bad.is_empty(), "the test plan's map has drifted:\n{}", bad.join("\n"));
}

#[test]
fn the_check_sees_a_missing_seed_line_and_a_missing_row() {
    // The checker against a small map, so that a check which silently passes is seen failing.
    let tsv = "# seed case\trust name\twhere it runs\n\
               testA\ta\ttest (unit or integration)\n\
               testB\tb\ttest with a real VM (QEMU/KVM guest)\n\
               testC\tc\tperf scenario (make perf)\n";
    let doc = "| `testA` | test | `x.rs::a` |\n| `testC` | perf | scenario `c` |\n";
    let f = |path: &str, name: &str, seeds: &[&str]| Func {
        path: path.into(),
        name: name.into(),
        test: true,
        seeds: seeds.iter().map(|s| s.to_string()).collect(),
    };
    let good = [f("x.rs", "a", &["testA"]), f("tests/realvm.rs", "b", &["testB"])];
    let table =
        "const SCENARIOS: &[Scenario] = &[\n    Scenario { name: \"c\", measures: \"\", with: &[], run: c },\n];\n\
                 fn c() { let _ = Scenario { name: \"d\" }; }\n";
    let names = scenario_names(table);
    assert_eq!(names, BTreeSet::from(["c".to_string()]), "the table's names, and only the table's");
    let bad = problems(tsv, doc, &good, &names);
    assert_eq!(bad, vec!["testB: no row in docs/test-plan.md".to_string()]);
    let funcs = [f("x.rs", "a", &[]), f("tests/dataplane.rs", "b", &["testB"])];
    let bad = problems(tsv, doc, &funcs, &BTreeSet::new());
    for want in [
        "testA: x.rs::a does not carry `/// seed: testA`",
        "testB: a real-VM case, but fn b( is not a test in tests/realvm.rs",
        "testC: perf/src/bin/omerta-perf/scenarios.rs has no scenario `c` in SCENARIOS",
    ] {
        assert!(bad.iter().any(|b| b == want), "{want} not in {bad:#?}");
    }
    let bad = problems(tsv, doc, &[f("x.rs", "a", &["testA"])], &names);
    assert!(bad.iter().any(|b| b.starts_with("testB: no #[test] fn b(")), "{bad:#?}");
}
