//! `cargo xtask rss`: the resident memory of a lone idle node beside a bare
//! rust-libp2p Kademlia node, measured in one run on this machine.
//!
//! Each process starts on loopback only (ports 0, mDNS off, a temporary
//! data directory), runs until it says it is running, idles a few seconds,
//! and is then read from `/proc`: `status` (VmRSS, RssAnon, RssFile,
//! RssShmem, threads), `smaps_rollup`, and `smaps` mapping by mapping, so
//! that the anonymous memory splits into the main heap, malloc's
//! per-thread arenas, thread stacks and other mappings, and the
//! file-backed memory into the executable and the shared libraries.
//! Variants (other binaries, environment variables, settings) run in the
//! same session, interleaved, so their numbers compare.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// What `cargo xtask rss` was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RssArgs {
    /// The `ollamacron-node` to measure instead of building the release one.
    #[arg(long)]
    pub(crate) binary: Option<PathBuf>,
    /// The bare Kademlia node to measure instead of building
    /// `xtask/examples/bare_kad.rs` in release.
    #[arg(long)]
    pub(crate) bare: Option<PathBuf>,
    /// Another `ollamacron-node` binary to measure beside it, as
    /// `LABEL=PATH` (repeatable), e.g. a build of main.
    #[arg(long = "compare", value_name = "LABEL=PATH")]
    pub(crate) compare: Vec<String>,
    /// Also run the node under test with each built-in experiment (malloc
    /// arenas, worker threads, QUIC, gateway, API, Ollama poller, TLS, DHT,
    /// NAT traversal, logging; one at a time, then all together).
    #[arg(long)]
    pub(crate) experiments: bool,
    /// A variant of the node under test, as `LABEL: ARG...` where `K=V`
    /// words with an upper-case `K` are environment variables and the
    /// rest are arguments of `ollamacron-node run` (`--listen` replaces
    /// the harness's listen addresses). Repeatable.
    #[arg(
        long = "variant",
        value_name = "LABEL: ARGS",
        allow_hyphen_values = true
    )]
    pub(crate) variants: Vec<String>,
    /// How long each process idles after it runs before it is read.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) idle: Duration,
    /// Measure each variant this many times (interleaved) and report the
    /// run with the median RSS.
    #[arg(long, default_value_t = 1)]
    pub(crate) repeat: usize,
    /// Where to write the JSON report (default: target/rss/rss.json).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// Longest a process may take to say it runs.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// glibc's malloc heaps for arenas other than the main one are mmapped
/// regions of this size (`HEAP_MAX_SIZE` on 64-bit), of which only the
/// used part is readable and writable.
const ARENA_HEAP_SIZE: u64 = 64 * 1024 * 1024;

/// Largest guard page region below a thread stack (glibc's default guard
/// is one page; Rust's std asks for one page too).
const MAX_STACK_GUARD: u64 = 64 * 1024;

/// Which program a variant runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Program {
    /// `ollamacron-node run` with the harness's loopback settings.
    Node(PathBuf),
    /// The bare Kademlia example.
    Bare(PathBuf),
}

/// One thing measured: a program, with environment variables and extra
/// arguments.
#[derive(Debug, Clone)]
struct Variant {
    label: String,
    program: Program,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Variant {
    fn node(label: &str, binary: &Path) -> Self {
        Self {
            label: label.to_owned(),
            program: Program::Node(binary.to_path_buf()),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// This variant of the node under test, from `LABEL: ARG...`.
    fn parse(spec: &str, binary: &Path) -> anyhow::Result<Self> {
        let (label, rest) = spec
            .split_once(':')
            .with_context(|| format!("--variant {spec}: expected `LABEL: ARG...`"))?;
        let mut variant = Self::node(label.trim(), binary);
        for word in rest.split_whitespace() {
            match word.split_once('=') {
                Some((key, value))
                    if !key.starts_with('-')
                        && key.chars().next().is_some_and(|c| c.is_ascii_uppercase()) =>
                {
                    variant.env.push((key.to_owned(), value.to_owned()));
                }
                _ => variant.args.push(word.to_owned()),
            }
        }
        Ok(variant)
    }

    fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn with_args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    fn with_set(self, setting: &str) -> Self {
        self.with_args(&["--set", setting])
    }
}

/// The built-in experiments on the node under test: one hypothesis each
/// about where its memory goes, then everything optional off at once.
fn experiments(binary: &Path) -> Vec<Variant> {
    let node = |label: &str| Variant::node(label, binary);
    let tcp_only = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    vec![
        node("MALLOC_ARENA_MAX=1").with_env("MALLOC_ARENA_MAX", "1"),
        node("MALLOC_ARENA_MAX=2").with_env("MALLOC_ARENA_MAX", "2"),
        node("1 worker (max_cpu=1)").with_set("max_cpu=1"),
        node("no QUIC (TCP only)").with_args(&tcp_only),
        node("no gateway").with_set("enable_gateway=false"),
        node("no API/metrics").with_set("enable_metrics=false"),
        node("no Ollama poller").with_set("enable_ollama=false"),
        node("no TLS on TCP").with_set("enable_tls=false"),
        node("no DHT").with_args(&["--no-dht"]),
        node("no hole punch/auto relay")
            .with_set("enable_hole_punch=false")
            .with_set("enable_auto_relay=false"),
        node("no logging").with_set("enable_logging=false"),
        node("all of the above")
            .with_env("MALLOC_ARENA_MAX", "1")
            .with_args(&tcp_only)
            .with_args(&["--no-dht"])
            .with_set("max_cpu=1")
            .with_set("enable_gateway=false")
            .with_set("enable_metrics=false")
            .with_set("enable_ollama=false")
            .with_set("enable_tls=false")
            .with_set("enable_hole_punch=false")
            .with_set("enable_auto_relay=false")
            .with_set("enable_logging=false"),
    ]
}

/// `path` made absolute (each process runs in its own directory).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("no file at {}", path.display()))
}

/// Every variant of this run, in the order they are reported.
fn variants(args: &RssArgs, node: &Path, bare: &Path) -> anyhow::Result<Vec<Variant>> {
    let mut all = vec![Variant::node("node", node)];
    for spec in &args.compare {
        let (label, path) = spec
            .split_once('=')
            .with_context(|| format!("--compare {spec}: expected LABEL=PATH"))?;
        let path = absolute(Path::new(path)).with_context(|| format!("--compare {spec}"))?;
        all.push(Variant::node(label, &path));
    }
    if args.experiments {
        all.extend(experiments(node));
    }
    for spec in &args.variants {
        all.push(Variant::parse(spec, node)?);
    }
    all.push(Variant {
        label: "bare Kademlia node".to_owned(),
        program: Program::Bare(bare.to_path_buf()),
        env: Vec::new(),
        args: Vec::new(),
    });
    Ok(all)
}

/// Memory of one process, in KiB, as `/proc` gives it.
#[derive(Debug, Clone, Default)]
struct Sample {
    vm_rss: u64,
    rss_anon: u64,
    rss_file: u64,
    rss_shmem: u64,
    vm_hwm: u64,
    threads: u64,
    /// `smaps_rollup`, field by field (kB).
    rollup: BTreeMap<String, u64>,
    /// Resident memory by kind of mapping (kB).
    breakdown: BTreeMap<&'static str, u64>,
    /// Resident pages of the executable by ELF section (KiB): what of the
    /// binary is in memory (`/proc/<pid>/pagemap`).
    exe_sections: BTreeMap<String, u64>,
    /// Thread names and how many threads carry each.
    thread_names: BTreeMap<String, u64>,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "vm_rss_kib": self.vm_rss,
            "rss_anon_kib": self.rss_anon,
            "rss_file_kib": self.rss_file,
            "rss_shmem_kib": self.rss_shmem,
            "vm_hwm_kib": self.vm_hwm,
            "threads": self.threads,
            "smaps_rollup_kib": self.rollup,
            "breakdown_kib": self.breakdown,
            "exe_resident_by_section_kib": self.exe_sections,
            "thread_names": self.thread_names,
        })
    }
}

/// A `kB` value of a `/proc` line (`VmRSS:   1234 kB`).
fn kib(value: &str) -> Option<u64> {
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Read a process's memory from `/proc` (Linux).
fn read_sample(pid: u32, exe: &Path) -> anyhow::Result<Sample> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(kib)
            .unwrap_or_default()
    };
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default();
    let mut sample = Sample {
        vm_rss: field("VmRSS"),
        rss_anon: field("RssAnon"),
        rss_file: field("RssFile"),
        rss_shmem: field("RssShmem"),
        vm_hwm: field("VmHWM"),
        threads,
        ..Sample::default()
    };
    let rollup = std::fs::read_to_string(proc_dir.join("smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    for line in rollup.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':')
            && let Some(v) = kib(value)
        {
            sample.rollup.insert(name.to_owned(), v);
        }
    }
    let smaps = std::fs::read_to_string(proc_dir.join("smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let mappings = parse_smaps(&smaps);
    sample.breakdown = breakdown(&mappings, &exe);
    sample.exe_sections = exe_sections(pid, &mappings, &exe).unwrap_or_default();
    if let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) {
        for task in tasks.flatten() {
            let name = std::fs::read_to_string(task.path().join("comm"))
                .map(|n| n.trim().to_owned())
                .unwrap_or_default();
            *sample.thread_names.entry(name).or_default() += 1;
        }
    }
    Ok(sample)
}

/// One mapping of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    /// Offset of the mapping in its file.
    offset: u64,
    /// The file, `[heap]`, `[stack]`, … or empty for anonymous memory.
    path: String,
    rss_kib: u64,
    anonymous_kib: u64,
}

impl Mapping {
    fn size(&self) -> u64 {
        self.end - self.start
    }

    fn is_anonymous(&self) -> bool {
        self.path.is_empty()
    }

    fn is_inaccessible(&self) -> bool {
        self.perms.starts_with("---")
    }
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let perms = words.next().unwrap_or_default().to_owned();
            let offset = words
                .next()
                .and_then(|o| u64::from_str_radix(o, 16).ok())
                .unwrap_or_default();
            // device, inode, then the path (which may hold spaces).
            let path = words.skip(2).collect::<Vec<_>>().join(" ");
            mappings.push(Mapping {
                start,
                end,
                perms,
                offset,
                path,
                rss_kib: 0,
                anonymous_kib: 0,
            });
            continue;
        }
        let Some(current) = mappings.last_mut() else {
            continue;
        };
        if let Some(v) = line.strip_prefix("Rss:").and_then(kib) {
            current.rss_kib = v;
        } else if let Some(v) = line.strip_prefix("Anonymous:").and_then(kib) {
            current.anonymous_kib = v;
        }
    }
    mappings
}

/// Resident memory by kind: the executable's pages (file-backed, and its
/// written data), shared libraries, the main heap (`brk`), malloc arenas
/// (a readable part and an inaccessible rest that make one 64 MiB region),
/// thread stacks (a mapping right above its inaccessible guard), the main
/// stack, and other anonymous memory (large allocations malloc maps alone,
/// the `.bss` of the executable, …).
fn breakdown(mappings: &[Mapping], exe: &Path) -> BTreeMap<&'static str, u64> {
    let exe = exe.to_string_lossy();
    let mut out: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (i, m) in mappings.iter().enumerate() {
        if m.rss_kib == 0 {
            continue;
        }
        let file_kib = m.rss_kib.saturating_sub(m.anonymous_kib);
        let kind_of_file = if m.path == exe.as_ref() {
            Some(("exe file", "exe anon (relocated/written data)"))
        } else if m.path.starts_with('/') {
            Some(("shared libraries file", "shared libraries anon"))
        } else {
            None
        };
        if let Some((file, anon)) = kind_of_file {
            *out.entry(file).or_default() += file_kib;
            *out.entry(anon).or_default() += m.anonymous_kib;
            continue;
        }
        let kind = match m.path.as_str() {
            "[heap]" => "anon: main heap (brk)",
            "[stack]" => "anon: main thread stack",
            "" => {
                let below = i.checked_sub(1).and_then(|j| mappings.get(j));
                let above = mappings.get(i + 1);
                let guard_below = below.is_some_and(|g| {
                    g.is_anonymous()
                        && g.is_inaccessible()
                        && g.end == m.start
                        && g.size() <= MAX_STACK_GUARD
                });
                let arena = above.is_some_and(|rest| {
                    rest.is_anonymous()
                        && rest.is_inaccessible()
                        && rest.start == m.end
                        && m.size() + rest.size() == ARENA_HEAP_SIZE
                }) || (m.size() == ARENA_HEAP_SIZE && m.start % ARENA_HEAP_SIZE == 0);
                if arena {
                    "anon: malloc arenas"
                } else if guard_below {
                    "anon: thread stacks"
                } else {
                    "anon: other mappings"
                }
            }
            _ => "anon: other named",
        };
        *out.entry(kind).or_default() += m.rss_kib;
    }
    out
}

const PAGE: u64 = 4096;

/// An allocated section of an ELF64 little-endian file: name, virtual
/// address, size.
fn elf_sections(file: &[u8]) -> Option<Vec<(String, u64, u64)>> {
    const SHF_ALLOC: u64 = 2;
    let u16_at = |at: usize| Some(u16::from_le_bytes(file.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(file.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(file.get(at..at + 8)?.try_into().ok()?));
    // ELF magic, 64-bit, little-endian.
    if file.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let header = |i: usize| shoff + i * shentsize;
    let strtab = usize::try_from(u64_at(header(shstrndx) + 0x18)?).ok()?;
    let mut sections = Vec::new();
    for i in 0..shnum {
        let h = header(i);
        let flags = u64_at(h + 0x08)?;
        if flags & SHF_ALLOC == 0 {
            continue;
        }
        let name_at = strtab + usize::try_from(u32_at(h)?).ok()?;
        let name = file.get(name_at..)?.split(|b| *b == 0).next()?;
        sections.push((
            String::from_utf8_lossy(name).into_owned(),
            u64_at(h + 0x10)?,
            u64_at(h + 0x20)?,
        ));
    }
    Some(sections)
}

/// Resident KiB of the executable's mappings by ELF section, from the
/// present bits of `/proc/<pid>/pagemap` (readable for one's own
/// processes). A page shared by two sections counts for the first.
fn exe_sections(pid: u32, mappings: &[Mapping], exe: &Path) -> Option<BTreeMap<String, u64>> {
    use std::io::{Read, Seek, SeekFrom};
    let exe_name = exe.to_string_lossy();
    let ours: Vec<&Mapping> = mappings.iter().filter(|m| m.path == exe_name).collect();
    // The load bias: where file offset 0 (virtual address 0 of a PIE) sits.
    let first = ours.iter().find(|m| m.offset == 0)?;
    let bias = first.start;
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let mut resident: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for m in &ours {
        let pages = usize::try_from(m.size() / PAGE).ok()?;
        let mut entries = vec![0u8; pages * 8];
        pagemap.seek(SeekFrom::Start(m.start / PAGE * 8)).ok()?;
        pagemap.read_exact(&mut entries).ok()?;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let value = u64::from_le_bytes(entry.try_into().ok()?);
            if value >> 63 == 1 {
                resident.insert((m.start - bias) / PAGE + i as u64);
            }
        }
    }
    let sections = elf_sections(&std::fs::read(exe).ok()?)?;
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    let mut counted = std::collections::BTreeSet::new();
    for (name, addr, size) in sections {
        if addr == 0 || size == 0 {
            continue;
        }
        let pages = addr / PAGE..=(addr + size - 1) / PAGE;
        let n = resident
            .range(pages)
            .filter(|p| counted.insert(**p))
            .count() as u64;
        *out.entry(name).or_default() += n * PAGE / 1024;
    }
    let other = resident.len() as u64 - counted.len() as u64;
    if other > 0 {
        out.insert("(no section)".to_owned(), other * PAGE / 1024);
    }
    Some(out)
}

/// One started process; dropping it kills it and removes its directory.
struct Running {
    child: Child,
    dir: PathBuf,
    exe: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start a variant and wait until it runs.
fn start(variant: &Variant, root: &Path, index: usize) -> anyhow::Result<Running> {
    let dir = root.join(format!("run-{index}"));
    std::fs::create_dir_all(&dir)?;
    let (exe, mut command) = match &variant.program {
        Program::Node(binary) => {
            let mut command = Command::new(binary);
            command.arg("run").arg("--data-dir").arg(&dir);
            command.args(["--no-mdns", "--api-listen", "127.0.0.1:0"]);
            command.args(["--set", "gateway_listen=127.0.0.1:0"]);
            if !variant.args.iter().any(|a| a == "--listen") {
                command.args([
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--listen",
                    "/ip4/127.0.0.1/udp/0/quic-v1",
                ]);
            }
            command.args(&variant.args);
            (binary.clone(), command)
        }
        Program::Bare(binary) => {
            let mut command = Command::new(binary);
            command.args(&variant.args);
            (binary.clone(), command)
        }
    };
    // A clean environment for what this harness controls: the node's
    // settings, the log filter, malloc's and tokio's knobs, Ollama's address.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("OLLAMACRON_")
            || key.starts_with("MALLOC_")
            || key.starts_with("GLIBC_TUNABLES")
            || key == "RUST_LOG"
            || key == "TOKIO_WORKER_THREADS"
            || key == "OLLAMA_HOST"
        {
            command.env_remove(key.as_ref());
        }
    }
    command.envs(variant.env.iter().map(|(k, v)| (k, v)));
    command
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let (tx, lines) = mpsc::channel::<String>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        // Keep draining after the start so the process never blocks on a
        // full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let running = Running { child, dir, exe };
    let deadline = Instant::now() + START_TIMEOUT;
    let mut log = Vec::new();
    let quiet_logs = variant.args.iter().any(|a| a == "enable_logging=false");
    if quiet_logs {
        // Nothing will say it runs: give it the time a lone node takes to
        // start (well under a second) twice over, and check it is alive.
        std::thread::sleep(Duration::from_secs(2));
        let mut running = running;
        if let Some(status) = running.child.try_wait()? {
            bail!("{} exited at start ({status})", variant.label);
        }
        std::thread::spawn(move || for _ in lines {});
        return Ok(running);
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            bail!(
                "{} did not say it runs within {}s; its output:\n{}",
                variant.label,
                START_TIMEOUT.as_secs(),
                log.join("\n")
            );
        };
        if line.contains("node running") {
            std::thread::spawn(move || for _ in lines {});
            return Ok(running);
        }
        log.push(line);
    }
}

fn mib(kib: u64) -> f64 {
    // KiB to MiB for display; exact enough.
    #[allow(clippy::cast_precision_loss)]
    let v = kib as f64 / 1024.0;
    v
}

fn signed_mib(a: u64, b: u64) -> String {
    let diff = mib(a) - mib(b);
    format!("{diff:+.1}")
}

/// Build what is not given, then measure every variant.
pub(crate) fn rss(args: &RssArgs) -> anyhow::Result<()> {
    if !Path::new("/proc/self/smaps_rollup").exists() {
        bail!("cargo xtask rss reads /proc/<pid>/smaps_rollup: it runs on Linux 4.14 or later");
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let node = match &args.binary {
        Some(path) => absolute(path)?,
        None => crate::build_node()?,
    };
    let bare = match &args.bare {
        Some(path) => absolute(path)?,
        None => build_bare()?,
    };
    let all = variants(args, &node, &bare)?;
    let root = std::env::temp_dir().join(format!("ollamacron-rss-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = measure_all(args, &all, &root);
    let _ = std::fs::remove_dir_all(&root);
    let samples = result?;
    report(args, &all, &samples)
}

/// Build `xtask/examples/bare_kad.rs` with the release profile; its path.
fn build_bare() -> anyhow::Result<PathBuf> {
    crate::build_release_example("xtask", "bare_kad")
}

/// Every variant, `repeat` times, interleaved; the samples by variant.
fn measure_all(args: &RssArgs, all: &[Variant], root: &Path) -> anyhow::Result<Vec<Vec<Sample>>> {
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); all.len()];
    let mut index = 0;
    for round in 0..args.repeat {
        for (i, variant) in all.iter().enumerate() {
            index += 1;
            eprintln!(
                "==> rss [{}/{}] {}",
                round * all.len() + i + 1,
                args.repeat * all.len(),
                variant.label
            );
            let mut running = start(variant, root, index)?;
            std::thread::sleep(args.idle);
            if let Some(status) = running.child.try_wait()? {
                bail!("{} exited while idle ({status})", variant.label);
            }
            let sample = read_sample(running.child.id(), &running.exe)?;
            samples[i].push(sample);
            drop(running);
        }
    }
    Ok(samples)
}

/// The run with the median VmRSS.
fn median(samples: &[Sample]) -> Option<&Sample> {
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by_key(|s| s.vm_rss);
    sorted.get(sorted.len() / 2).copied()
}

fn report(args: &RssArgs, all: &[Variant], samples: &[Vec<Sample>]) -> anyhow::Result<()> {
    let bare = all
        .iter()
        .zip(samples)
        .find(|(v, _)| matches!(v.program, Program::Bare(_)))
        .and_then(|(_, s)| median(s))
        .cloned()
        .unwrap_or_default();
    println!();
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8}  {:>12}",
        "variant (MiB)",
        "VmRSS",
        "RssAnon",
        "RssFile",
        "Shmem",
        "threads",
        "vs bare",
        "runs (VmRSS)"
    );
    let mut rows = Vec::new();
    for (variant, runs) in all.iter().zip(samples) {
        let Some(s) = median(runs) else { continue };
        let spread: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1}", mib(r.vm_rss)))
            .collect();
        println!(
            "{:<28} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>8} {:>8}  {:>12}",
            variant.label,
            mib(s.vm_rss),
            mib(s.rss_anon),
            mib(s.rss_file),
            mib(s.rss_shmem),
            s.threads,
            signed_mib(s.vm_rss, bare.vm_rss),
            spread.join(" "),
        );
        rows.push(json!({
            "label": variant.label,
            "program": match &variant.program {
                Program::Node(p) | Program::Bare(p) => p.display().to_string(),
            },
            "bare": matches!(variant.program, Program::Bare(_)),
            "env": variant.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "args": variant.args,
            "median": s.to_json(),
            "runs_vm_rss_kib": runs.iter().map(|r| r.vm_rss).collect::<Vec<_>>(),
            "vs_bare_kib": i128::from(s.vm_rss) - i128::from(bare.vm_rss),
        }));
    }
    // Where the memory sits, for each binary (not the experiments).
    let shown: Vec<(&Variant, &Sample)> = all
        .iter()
        .zip(samples)
        .filter(|(v, _)| v.env.is_empty() && v.args.is_empty())
        .filter_map(|(v, s)| Some((v, median(s)?)))
        .collect();
    let kinds = |of: &dyn Fn(&Sample) -> Vec<String>| {
        let mut all: Vec<String> = shown.iter().flat_map(|(_, s)| of(s)).collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    let breakdown_kinds = kinds(&|s| s.breakdown.keys().map(|k| (*k).to_owned()).collect());
    print_columns(
        "resident by mapping (MiB)",
        &shown,
        &breakdown_kinds,
        |s, k| s.breakdown.get(k).copied(),
    );
    // Small sections together, so the table stays short.
    const OTHER: &str = "(other sections)";
    let mut sections = kinds(&|s| {
        s.exe_sections
            .iter()
            .filter(|(_, kib)| **kib >= 64)
            .map(|(name, _)| name.clone())
            .collect()
    });
    let listed = sections.clone();
    sections.push(OTHER.to_owned());
    print_columns(
        "executable resident by section (MiB)",
        &shown,
        &sections,
        |s, k| {
            if k == OTHER {
                Some(
                    s.exe_sections
                        .iter()
                        .filter(|(name, _)| !listed.contains(name))
                        .map(|(_, kib)| *kib)
                        .sum(),
                )
            } else {
                s.exe_sections.get(k).copied()
            }
        },
    );
    for (v, s) in &shown {
        let names: Vec<String> = s
            .thread_names
            .iter()
            .map(|(name, n)| format!("{name} x{n}"))
            .collect();
        println!("threads of {}: {}", v.label, names.join(", "));
    }
    let report = json!({
        "idle_secs": args.idle.as_secs_f64(),
        "repeat": args.repeat,
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        "variants": rows,
    });
    let path = args
        .json
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("rss").join("rss.json"));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// A table: one row per kind, one column per variant, in MiB.
fn print_columns(
    title: &str,
    shown: &[(&Variant, &Sample)],
    kinds: &[String],
    value: impl Fn(&Sample, &str) -> Option<u64>,
) {
    println!();
    print!("{title:<38}");
    for (v, _) in shown {
        print!(" {:>20}", v.label);
    }
    println!();
    for kind in kinds {
        print!("{kind:<38}");
        for (_, s) in shown {
            print!(" {:>20.2}", mib(value(s, kind).unwrap_or_default()));
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5555000000-5555100000 r-xp 00000000 08:01 42 /opt/node
Rss:                 800 kB
Anonymous:             0 kB
5555100000-5555110000 rw-p 00100000 08:01 42 /opt/node
Rss:                  64 kB
Anonymous:            60 kB
5555200000-5555300000 rw-p 00000000 00:00 0 [heap]
Rss:                 500 kB
Anonymous:           500 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                 300 kB
Anonymous:           300 kB
7f0000100000-7f0004000000 ---p 00000000 00:00 0
Rss:                   0 kB
Anonymous:             0 kB
7f1000000000-7f1000001000 ---p 00000000 00:00 0
Rss:                   0 kB
Anonymous:             0 kB
7f1000001000-7f1000201000 rw-p 00000000 00:00 0
Rss:                  20 kB
Anonymous:            20 kB
7f2000000000-7f2000010000 rw-p 00000000 00:00 0
Rss:                  12 kB
Anonymous:            12 kB
7f3000000000-7f3000200000 r-xp 00000000 08:01 7 /usr/lib/libc.so.6
Rss:                 900 kB
Anonymous:             0 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  16 kB
Anonymous:            16 kB
";

    #[test]
    fn smaps_splits_into_exe_libraries_heap_arenas_stacks_and_the_rest() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 10);
        let by_kind = breakdown(&mappings, Path::new("/opt/node"));
        let get = |k: &str| by_kind.get(k).copied().unwrap_or_default();
        assert_eq!(get("exe file"), 804);
        assert_eq!(get("exe anon (relocated/written data)"), 60);
        assert_eq!(get("anon: main heap (brk)"), 500);
        assert_eq!(get("anon: malloc arenas"), 300);
        assert_eq!(get("anon: thread stacks"), 20);
        assert_eq!(get("anon: other mappings"), 12);
        assert_eq!(get("shared libraries file"), 900);
        assert_eq!(get("anon: main thread stack"), 16);
    }

    #[test]
    fn a_variant_splits_environment_from_arguments() {
        let v = Variant::parse(
            "arenas: MALLOC_ARENA_MAX=2 --set max_cpu=1 --listen /ip4/127.0.0.1/tcp/0",
            Path::new("/bin/node"),
        )
        .unwrap();
        assert_eq!(v.label, "arenas");
        assert_eq!(v.env, [("MALLOC_ARENA_MAX".to_owned(), "2".to_owned())]);
        assert_eq!(
            v.args,
            ["--set", "max_cpu=1", "--listen", "/ip4/127.0.0.1/tcp/0"]
        );
    }
}
