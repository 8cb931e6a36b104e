//! Several runner processes as one data-parallel job, as PyTorch's DistributedDataParallel
//! runs: one process per device (a *rank*), each keeping its own replica of the model and its
//! own optimizer state for the whole stage; every step each rank computes the gradients of its
//! slice of the global batch and one all-reduce sums them, so every rank takes the same step
//! from the same values. The all-reduce is burn's collective in its global mode (burn-collective
//! 0.21: a coordinator that ranks register with, and a ring between the ranks' own tensor
//! services over WebSocket); nothing here speaks to the network itself.
//!
//! Rank 0 owns the cache, the run directory and every artifact; the other ranks read what they
//! need from the shared cache and write nothing (docs/distributed.md).

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context, Result};

/// The most ranks a job takes: each is a process with its own port.
pub const MAX_RANKS: usize = 1024;

/// The longest host name a rank gives the others at the join.
const MAX_HOST: usize = 64;

/// The coordinator's port when Slurm gives none: torch.distributed's default, moved by the
/// job's id so that two jobs sharing a node do not collide.
const SLURM_BASE_PORT: u16 = 29500;

/// Which rank this process is, of how many, and where the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub ranks: usize,
    /// `host:port` of the coordinator, which rank 0 serves; every rank's tensor service
    /// listens on `port + 1 + rank`.
    pub coordinator: String,
    /// The coordinator's port.
    pub port: u16,
    /// This rank's host name as the others reach it.
    pub host: String,
    /// Every rank's host, once joined (`join`): where a rank that stopped answering is probed.
    pub hosts: Vec<String>,
}

/// How the world is given on the command line (`runner run`).
#[derive(Debug, Clone, Default)]
pub struct WorldArgs {
    pub ranks: Option<usize>,
    pub rank: Option<usize>,
    pub coordinator: Option<String>,
    /// Take all three from Slurm's variables (inside `srun`).
    pub slurm: bool,
}

/// One process alone: no collective.
pub static SINGLE: World = World { rank: 0, ranks: 1, coordinator: String::new(), port: 0, host: String::new(), hosts: Vec::new() };

impl World {
    /// One process alone: no collective.
    pub fn single() -> Self {
        SINGLE.clone()
    }

    pub fn is_single(&self) -> bool {
        self.ranks == 1
    }

    /// Rank 0 writes the cache, the run directory and the results; the others write nothing.
    pub fn writes(&self) -> bool {
        self.rank == 0
    }

    /// The world of `args`: explicit flags, Slurm's variables with `--slurm`, or one process.
    pub fn from_args(args: &WorldArgs) -> Result<Self> {
        if args.slurm {
            if args.ranks.is_some() || args.rank.is_some() {
                bail!("--slurm takes the ranks from Slurm: leave out --ranks and --rank");
            }
            return Self::from_slurm(&|name| std::env::var(name).ok(), args.coordinator.as_deref());
        }
        match (args.ranks, args.rank, &args.coordinator) {
            (None, None, None) => Ok(Self::single()),
            (Some(ranks), Some(rank), Some(coordinator)) => Self::new(rank, ranks, coordinator, &local_host_name()),
            (Some(1), None, None) => Ok(Self::single()),
            _ => bail!(
                "--ranks, --rank and --coordinator go together: e.g. `--ranks 2 --rank 0 --coordinator node1:29500` on the first process and `--rank 1` on the second\n  hint: under Slurm, `--slurm` takes all three from its variables"
            ),
        }
    }

    fn new(rank: usize, ranks: usize, coordinator: &str, host: &str) -> Result<Self> {
        if !(1..=MAX_RANKS).contains(&ranks) {
            bail!("--ranks {ranks}: must be from 1 to {MAX_RANKS}");
        }
        if rank >= ranks {
            bail!("--rank {rank}: must be below --ranks {ranks} (ranks count from 0)");
        }
        let (_, port) = split_host_port(coordinator)?;
        if usize::from(port) + 1 + ranks > usize::from(u16::MAX) {
            bail!("--coordinator {coordinator}: the ranks listen on ports {} to {}, past 65535\n  hint: choose a lower port", port as usize + 1, port as usize + ranks);
        }
        if ranks > 1 && !cfg!(feature = "collective") {
            bail!("--ranks {ranks}: this runner was built without burn's collective, which joins the ranks\n  hint: build it with `cargo build --release --features collective` (on with cuda)");
        }
        if host.len() > MAX_HOST {
            bail!("the host name {host:?} is longer than {MAX_HOST} bytes");
        }
        Ok(World { rank, ranks, coordinator: coordinator.to_string(), port, host: host.to_string(), hosts: Vec::new() })
    }

    /// The world of a task of `srun`: `SLURM_PROCID` of `SLURM_NTASKS`; the coordinator on the
    /// first host of `SLURM_JOB_NODELIST` (or `coordinator` when given) at a port of the job's.
    pub fn from_slurm(var: &dyn Fn(&str) -> Option<String>, coordinator: Option<&str>) -> Result<Self> {
        let number = |name: &str| -> Result<usize> {
            let text = var(name).with_context(|| format!("--slurm: {name} is not set: run the runner as a task of `srun` (the script of `runner run --emit-slurm` does)"))?;
            text.trim().parse().with_context(|| format!("--slurm: {name} = {text:?} is not a number"))
        };
        let (rank, ranks) = (number("SLURM_PROCID")?, number("SLURM_NTASKS")?);
        let coordinator = match coordinator {
            Some(c) => c.to_string(),
            None => {
                let list = var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST")).context("--slurm: SLURM_JOB_NODELIST is not set")?;
                let first = first_host(&list).with_context(|| format!("--slurm: SLURM_JOB_NODELIST = {list:?} names no host"))?;
                let job: u64 = var("SLURM_JOB_ID").and_then(|j| j.trim().parse().ok()).unwrap_or(0);
                format!("{first}:{}", SLURM_BASE_PORT + (job % 2000) as u16 * 16)
            }
        };
        let host = var("SLURMD_NODENAME").unwrap_or_else(local_host_name);
        Self::new(rank, ranks, &coordinator, &host)
    }

    /// The coordinator's port and the port of `rank`'s tensor service.
    pub fn ports(&self, rank: usize) -> (u16, u16) {
        (self.port, self.port + 1 + rank as u16)
    }

    /// The coordinator's address, resolved: a rank that cannot reach it is told so before it
    /// waits on it.
    pub fn coordinator_addr(&self) -> Result<SocketAddr> {
        self.coordinator
            .to_socket_addrs()
            .with_context(|| format!("--coordinator {}: cannot resolve the host", self.coordinator))?
            .next()
            .with_context(|| format!("--coordinator {}: the host has no address", self.coordinator))
    }
}

/// All-reduces this process has taken part in, and the bytes of their buffers: a ring sends
/// 2(N-1)/N of each buffer from every rank (the tests compare that with loopback's counters).
static ALL_REDUCED: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));

/// `(all-reduces, bytes of their buffers)` so far in this process.
pub fn all_reduced() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (ALL_REDUCED.0.load(Relaxed), ALL_REDUCED.1.load(Relaxed))
}

/// What identifies a rank's job at the join: a name and a digest (hex) per item, compared
/// across ranks so that ranks running another config, code or cache key are refused, each
/// difference named.
pub type Identity = Vec<(&'static str, String)>;

#[cfg(feature = "collective")]
pub use collective::{all_reduce, gather, join, leave, probe};

/// Bytes of a digest compared across ranks.
const DIGEST: usize = 16;

/// The first `DIGEST` bytes of a hex digest (of any text that is not one: its bytes), padded.
fn digest_bytes(digest: &str) -> Vec<u8> {
    let mut bytes = hex::decode(digest).unwrap_or_else(|_| digest.as_bytes().to_vec());
    bytes.resize(DIGEST, 0);
    bytes
}

/// Rank 0's decision whether the ranks run a training stage together (`run`, `None` on the
/// other ranks), after checking that every rank computed the same cache `key` for it: the
/// ranks' barrier before each stage they run together.
pub fn agree<B: burn::tensor::backend::Backend>(world: &World, device: &B::Device, stage: &str, key: &str, run: Option<bool>) -> Result<bool> {
    if world.is_single() {
        return Ok(run.unwrap_or(false));
    }
    let mut own = digest_bytes(key);
    own.push(u8::from(run == Some(true)));
    let rows = gather::<B>(world, device, &own)?;
    for (r, row) in rows.iter().enumerate().skip(1) {
        if row[..DIGEST] != rows[0][..DIGEST] {
            bail!(
                "stage `{stage}`: rank {r}'s cache key ({}) is not rank 0's ({})\n  hint: the ranks must read the same cache (RUNNER_CACHE on a filesystem they share) and run the same pipeline",
                hex::encode(&row[..DIGEST]),
                hex::encode(&rows[0][..DIGEST])
            );
        }
    }
    Ok(rows[0][DIGEST] == 1)
}

/// Refuses replicas that differ: every rank's `digest` of its model (hex) against rank 0's,
/// with `RUNNER_CHECK_REPLICAS=1` before every step (the tests' proof that the ranks step alike).
pub fn check_replicas<B: burn::tensor::backend::Backend>(world: &World, device: &B::Device, digest: &str) -> Result<()> {
    let rows = gather::<B>(world, device, &digest_bytes(digest))?;
    if let Some((r, row)) = rows.iter().enumerate().skip(1).find(|(_, row)| **row != rows[0]) {
        bail!("rank {r}'s replica ({}) is not rank 0's ({}): the ranks no longer take the same steps", hex::encode(row), hex::encode(&rows[0]));
    }
    Ok(())
}

/// Whether `RUNNER_CHECK_REPLICAS=1` asks the ranks to compare their replicas before every step.
pub fn checks_replicas() -> bool {
    static CHECK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHECK.get_or_init(|| std::env::var("RUNNER_CHECK_REPLICAS").is_ok_and(|v| v == "1"))
}

/// Without burn's collective only one rank exists (`World::new` refuses more): these are the
/// identity.
#[cfg(not(feature = "collective"))]
mod single {
    use super::*;
    use burn::tensor::{backend::Backend, Tensor};
    pub fn join<B: Backend>(_: &mut World, _: &B::Device, _: &Identity) -> Result<()> {
        Ok(())
    }
    pub fn all_reduce<B: Backend>(_: &World, values: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(values)
    }
    pub fn leave<B: Backend>(_: &World) {}
    pub fn probe(_: &World, _: usize) -> Result<()> {
        Ok(())
    }
    pub fn gather<B: Backend>(_: &World, _: &B::Device, own: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![own.to_vec()])
    }
}
#[cfg(not(feature = "collective"))]
pub use single::{all_reduce, gather, join, leave, probe};

#[cfg(feature = "collective")]
mod collective {
    use super::*;
    use burn::collective::{CollectiveConfig, PeerId, ReduceOperation, AllReduceStrategy};
    use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
    use std::time::Duration;

    /// How long an all-reduce may wait before the other ranks are probed: a rank that died
    /// refuses connections, and the survivors stop naming it.
    const PROBE_AFTER: Duration = Duration::from_secs(2);

    /// How long a rank waits for rank 0's coordinator to answer at all: ranks start at
    /// slightly different times, under Slurm too.
    const COORDINATOR_WAIT: Duration = Duration::from_secs(60);

    /// Registers this rank with the others (rank 0 first serves the coordinator), waits for all
    /// of them, then compares their identities: every rank gets the same error naming what
    /// differs, before any work.
    pub fn join<B: Backend>(world: &mut World, device: &B::Device, identity: &Identity) -> Result<()> {
        if world.is_single() {
            return Ok(());
        }
        let (port, own) = world.ports(world.rank);
        let free = |p: u16, what: &str| -> Result<()> {
            std::net::TcpListener::bind(("0.0.0.0", p)).map(drop).with_context(|| {
                format!("rank {}: port {p} ({what}) is taken on {}\n  hint: choose another --coordinator port, or end what holds it", world.rank, world.host)
            })
        };
        if world.rank == 0 {
            free(port, "the coordinator")?;
            std::thread::Builder::new().name("coordinator".into()).spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for the coordinator");
                runtime.block_on(burn::collective::start_global_orchestrator(port));
            })?;
        } else {
            world.coordinator_addr()?;
        }
        free(own, "this rank's tensor service")?;
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(world.ranks as u32)
            .with_global_address(format!("ws://{}", world.coordinator).parse().expect("an address is any string"))
            .with_node_address(format!("ws://{}:{own}", world.host).parse().expect("an address is any string"))
            .with_data_service_port(own)
            .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
        // burn-communication's servers install a logger of every transfer unless one is set.
        let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
        eprintln!("rank {} of {}: joining at {} ...", world.rank, world.ranks, world.coordinator);
        let (me, own_device) = (peer(world), device.clone());
        let registered = in_background("register", move || burn::collective::register::<B>(me, own_device, config));
        wait_for(world, registered, "joining the other ranks")?;
        world.hosts = check_identities::<B>(world, device, identity)?;
        Ok(())
    }

    fn peer(world: &World) -> PeerId {
        PeerId(world.rank as u32)
    }

    /// Each rank's host and identity compared with rank 0's. Returns the ranks' hosts.
    fn check_identities<B: Backend>(world: &World, device: &B::Device, identity: &Identity) -> Result<Vec<String>> {
        let mut own = world.host.as_bytes().to_vec();
        own.resize(MAX_HOST, 0);
        for (_, digest) in identity {
            own.extend(digest_bytes(digest));
        }
        let rows = gather::<B>(world, device, &own)?;
        let hosts = rows.iter().map(|r| String::from_utf8_lossy(&r[..MAX_HOST]).trim_end_matches('\0').to_string()).collect();
        let mut differences = Vec::new();
        for (r, row) in rows.iter().enumerate().skip(1) {
            for (i, (name, _)) in identity.iter().enumerate() {
                let item = MAX_HOST + i * DIGEST..MAX_HOST + (i + 1) * DIGEST;
                if row[item.clone()] != rows[0][item.clone()] {
                    differences.push(format!("rank {r}'s {name} ({}) is not rank 0's ({})", hex::encode(&row[item.clone()]), hex::encode(&rows[0][item])));
                }
            }
        }
        if !differences.is_empty() {
            bail!(
                "the ranks do not run the same job:\n  {}\n  hint: every rank must run the same runner build with the same pipeline, --with, --set and --force, on one shared cache (RUNNER_CACHE)",
                differences.join("\n  ")
            );
        }
        Ok(hosts)
    }

    /// Every rank's `own` bytes (as long on every rank), in rank order: each rank's in its own
    /// row of a zero matrix, summed.
    pub fn gather<B: Backend>(world: &World, device: &B::Device, own: &[u8]) -> Result<Vec<Vec<u8>>> {
        let row = own.len();
        let mut rows = vec![0f32; world.ranks * row];
        for (k, b) in own.iter().enumerate() {
            rows[world.rank * row + k] = f32::from(*b);
        }
        let n = rows.len();
        let summed = all_reduce::<B>(world, Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(rows, [n]), device))?;
        let all: Vec<f32> = summed.into_data().to_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(all.chunks(row.max(1)).map(|r| r.iter().map(|v| *v as u8).collect()).collect())
    }

    /// The sum over the ranks of `values`, every rank getting the same bytes. While it waits
    /// longer than a moment the other ranks are probed: a rank that is gone ends it with an
    /// error naming that rank, within seconds.
    pub fn all_reduce<B: Backend>(world: &World, values: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        if world.is_single() {
            return Ok(values);
        }
        let [len] = values.dims();
        if len < world.ranks {
            // The ring cuts the tensor in one slice per rank.
            let zeros = Tensor::zeros([world.ranks - len], &values.device());
            let padded = Tensor::cat(vec![values, zeros], 0);
            return Ok(all_reduce(world, padded)?.slice([0..len]));
        }
        ALL_REDUCED.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ALL_REDUCED.1.fetch_add(4 * len as u64, std::sync::atomic::Ordering::Relaxed);
        let (me, primitive) = (peer(world), values.into_primitive().tensor());
        let summed = in_background("all-reduce", move || burn::collective::all_reduce::<B>(me, primitive, ReduceOperation::Sum));
        Ok(Tensor::from_primitive(TensorPrimitive::Float(wait_for(world, summed, "the all-reduce")?)))
    }

    /// `call` on a thread of its own: burn's collective calls block without a limit.
    fn in_background<T: Send + 'static>(name: &str, call: impl FnOnce() -> Result<T, burn::collective::CollectiveError> + Send + 'static) -> std::sync::mpsc::Receiver<Result<T, burn::collective::CollectiveError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = tx.send(call());
            })
            .expect("a thread for the collective");
        rx
    }

    /// The result of a collective call, probing the other ranks (or, before they are known,
    /// the coordinator) while it waits: a rank that is gone, a coordinator that never answers
    /// or a signal ends the wait with an error.
    fn wait_for<T>(world: &World, rx: std::sync::mpsc::Receiver<Result<T, burn::collective::CollectiveError>>, what: &str) -> Result<T> {
        use std::sync::mpsc::RecvTimeoutError;
        let start = std::time::Instant::now();
        loop {
            match rx.recv_timeout(PROBE_AFTER) {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => {
                    probe_all(world)?;
                    bail!("rank {}: {what} failed: {e:?}", world.rank)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    probe_all(world)?;
                    bail!("rank {}: {what} stopped (burn's collective panicked)", world.rank)
                }
                Err(RecvTimeoutError::Timeout) => {
                    crate::interrupt::check()?;
                    if world.hosts.is_empty() && world.rank != 0 && start.elapsed() > COORDINATOR_WAIT {
                        let reachable = world.coordinator_addr().ok().is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
                        if !reachable {
                            bail!(
                                "rank {}: no coordinator answers at {} after {} s: rank 0 has not started, or ended (see its error)\n  hint: start rank 0 with the same --coordinator; under Slurm, every task runs `runner run ... --slurm`",
                                world.rank,
                                world.coordinator,
                                start.elapsed().as_secs()
                            );
                        }
                    }
                    probe_all(world)?;
                }
            }
        }
    }

    fn probe_all(world: &World) -> Result<()> {
        (0..world.ranks).filter(|&r| r != world.rank).try_for_each(|r| probe(world, r))
    }

    /// An error naming rank `rank` when its tensor service refuses a connection: the rank is
    /// gone (a TCP connect and nothing more).
    pub fn probe(world: &World, rank: usize) -> Result<()> {
        let Some(host) = world.hosts.get(rank) else { return Ok(()) };
        let (_, port) = world.ports(rank);
        let addr = (host.as_str(), port).to_socket_addrs().ok().and_then(|mut a| a.next());
        if let Some(addr) = addr {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
                bail!("rank {rank} ({host}:{port}) is gone: its process ended or its node is unreachable; rank {} stops too\n  hint: see rank {rank}'s own error; run the same command again on every rank to resume", world.rank);
            }
        }
        Ok(())
    }

    /// Unregisters this rank at the end of the job.
    pub fn leave<B: Backend>(world: &World) {
        if !world.is_single() {
            let _ = burn::collective::finish_collective::<B>(peer(world));
        }
    }
}

fn split_host_port(text: &str) -> Result<(&str, u16)> {
    let (host, port) = text.rsplit_once(':').with_context(|| format!("--coordinator {text:?}: expected host:port, e.g. node1:29500"))?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0).with_context(|| format!("--coordinator {text:?}: the port must be from 1 to 65535"))?;
    if host.is_empty() {
        bail!("--coordinator {text:?}: expected host:port, e.g. node1:29500");
    }
    Ok((host, port))
}

/// The first host of a Slurm host list: `node[03-05,9],gpu1` gives `node03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inside = &list[end + 1..list[end..].find(']')? + end];
        let first = inside.split([',', '-']).next()?;
        return (!first.is_empty()).then(|| format!("{prefix}{first}"));
    }
    (!prefix.is_empty()).then(|| prefix.to_string())
}

fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_slurm_lists() {
        assert_eq!(first_host("node[03-05,9],gpu1").as_deref(), Some("node03"));
        assert_eq!(first_host("gpu7,gpu8").as_deref(), Some("gpu7"));
        assert_eq!(first_host("a100-[1,4]").as_deref(), Some("a100-1"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn slurm_variables_make_the_world() {
        let vars = |name: &str| match name {
            "SLURM_PROCID" => Some("3".into()),
            "SLURM_NTASKS" => Some("4".into()),
            "SLURM_JOB_NODELIST" => Some("node[07-08]".into()),
            "SLURM_JOB_ID" => Some("2001".into()),
            "SLURMD_NODENAME" => Some("node08".into()),
            _ => None,
        };
        let world = World::from_slurm(&vars, None);
        if cfg!(feature = "collective") {
            let w = world.unwrap();
            assert_eq!((w.rank, w.ranks, w.coordinator.as_str(), w.host.as_str()), (3, 4, "node07:29516", "node08"));
        } else {
            assert!(world.unwrap_err().to_string().contains("--features collective"));
        }
        let err = World::from_slurm(&|_| None, None).unwrap_err().to_string();
        assert!(err.contains("SLURM_PROCID is not set"), "{err}");
    }

    #[test]
    fn explicit_flags_are_checked() {
        let args = |ranks, rank, c: Option<&str>| WorldArgs { ranks, rank, coordinator: c.map(String::from), slurm: false };
        assert!(World::from_args(&args(None, None, None)).unwrap().is_single());
        let err = World::from_args(&args(Some(2), None, None)).unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
        let err = World::from_args(&args(Some(2), Some(2), Some("h:1"))).unwrap_err().to_string();
        assert!(err.contains("--rank 2: must be below --ranks 2"), "{err}");
        let err = World::from_args(&args(Some(2), Some(0), Some("h"))).unwrap_err().to_string();
        assert!(err.contains("expected host:port"), "{err}");
        let err = World::from_args(&args(Some(2), Some(0), Some("h:65535"))).unwrap_err().to_string();
        assert!(err.contains("past 65535"), "{err}");
    }
}
