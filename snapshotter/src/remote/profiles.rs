//! Access profiles of images (format: [`clip_index::profile`]; recording and replay:
//! [`clip_readpath::profile`]). For each image whose layers are served lazily, the book looks
//! its profile up (the profile store under the root, then the referrers of the image manifest in
//! its registry) while a recorder notes what the start reads. A profile found is replayed into
//! every layer of the image that is or gets mounted, and the recording is dropped; without one,
//! the recording, once reads go quiet, is kept and published to the image's registry (an
//! artifact referring to the image manifest, with the image's own credentials, where they may
//! push). A corrupt, foreign or unreachable profile is logged and ignored.

use bytes::Bytes;
use clip_config::ProfilesConfig;
use clip_config::labels::RemoteRequest;
use clip_index::profile::{
    AccessProfile, MAX_PROFILE_BYTES, PROFILE_ARTIFACT_TYPE, PROFILE_MEDIA_TYPE, ProfileError, profile_blob,
};
use clip_readpath::{ReadObserver, Recorder, Recording, ReplayPolicy, Replayer, SpanCache};
use clip_registry::api::Subject;
use clip_registry::{Platform, RegistryError, Repository};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// A recorder that saw no read for this long after its image's first Prepare is dropped.
const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// How often recordings are checked for their end.
const TICK: Duration = Duration::from_millis(200);
/// Spans between two profiled ones fetched in the same request.
const GAP_SPANS: u32 = 0;

#[derive(Debug, thiserror::Error)]
enum ProfileFetchError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

enum Lookup {
    Pending,
    Found(Arc<AccessProfile>),
    Absent,
}

struct ImageState {
    subject: Option<Subject>,
    /// The image's layers (those prepared so far, then the manifest's).
    layers: HashSet<String>,
    recorder: Option<Arc<Recorder>>,
    lookup: Lookup,
    /// Layers whose part of the profile is queued already.
    replayed: HashSet<String>,
    created: Instant,
}

struct ImageProfile {
    image_ref: String,
    repo: Arc<Repository>,
    state: Mutex<ImageState>,
}

/// What the daemon knows of the access profiles of the images it serves.
pub(crate) struct ProfileBook {
    dir: PathBuf,
    publish: bool,
    quiet: Duration,
    limit: Duration,
    replayer: Option<Replayer>,
    runtime: tokio::runtime::Handle,
    images: Mutex<HashMap<String, Arc<ImageProfile>>>,
    /// Recorders running (reads skip the book when none is).
    recording: AtomicUsize,
    /// Mounted layers' span caches, by layer digest.
    caches: Mutex<HashMap<String, Weak<SpanCache>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for ProfileBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProfileBook({})", self.dir.display())
    }
}

/// Parses a profile blob and checks it belongs to the image `digest` with `layers`.
fn parse_for(bytes: &[u8], digest: &str, layers: &HashSet<String>) -> Result<AccessProfile, ProfileError> {
    let p = AccessProfile::parse(bytes)?;
    p.check_image(digest)?;
    if let Some(l) = p.layers.iter().find(|l| !layers.contains(*l)) {
        return Err(ProfileError::Invalid(format!("it names layer {l}, which the image does not have")));
    }
    Ok(p)
}

impl ProfileBook {
    /// The book `[lazy.profiles]` asks for (`None`: profiles off), keeping profiles in `dir`,
    /// with its recording clock running.
    pub(crate) fn start(
        cfg: &ProfilesConfig,
        dir: PathBuf,
        runtime: tokio::runtime::Handle,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Option<Arc<Self>> {
        if !cfg.enabled {
            tracing::info!("access profiles are off");
            return None;
        }
        let book = Arc::new(Self {
            dir,
            publish: cfg.publish,
            quiet: Duration::from_millis(cfg.quiet_ms),
            limit: Duration::from_secs(cfg.limit_s),
            replayer: Replayer::start(ReplayPolicy {
                threads: cfg.threads,
                gap_spans: GAP_SPANS,
                request_bytes: cfg.request_bytes,
            }),
            runtime,
            images: Mutex::new(HashMap::new()),
            recording: AtomicUsize::new(0),
            caches: Mutex::new(HashMap::new()),
            metrics,
        });
        let weak = Arc::downgrade(&book);
        let clock = std::thread::Builder::new().name("clip-profiles".into()).spawn(move || {
            while let Some(book) = weak.upgrade() {
                book.tick();
                drop(book);
                std::thread::sleep(TICK);
            }
        });
        if let Err(e) = clock {
            tracing::error!(error = %e, "cannot start the profile clock; profiles will not be recorded");
        }
        Some(book)
    }

    fn path(&self, manifest_digest: &str) -> PathBuf {
        self.dir.join(format!("{}.json", manifest_digest.replace(':', "-")))
    }

    /// A layer of `req`'s image is being opened for a lazy Prepare (before its index is
    /// loaded, so that the lookup overlaps that fetch): the first one starts the image's
    /// recording and its profile lookup. When no layer of the image ends up mounted, nothing is
    /// recorded or replayed and the recording ends after [`IDLE_LIMIT`].
    pub(crate) fn image_opened(self: &Arc<Self>, repo: &Arc<Repository>, req: &RemoteRequest) {
        let mut images = self.images.lock();
        if let Some(img) = images.get(&req.image_ref) {
            img.state.lock().layers.insert(req.layer_digest.clone());
            return;
        }
        let img = Arc::new(ImageProfile {
            image_ref: req.image_ref.clone(),
            repo: repo.clone(),
            state: Mutex::new(ImageState {
                subject: None,
                layers: HashSet::from([req.layer_digest.clone()]),
                recorder: Some(Arc::new(Recorder::default())),
                lookup: Lookup::Pending,
                replayed: HashSet::new(),
                created: Instant::now(),
            }),
        });
        self.recording.fetch_add(1, Ordering::Relaxed);
        images.insert(req.image_ref.clone(), img.clone());
        drop(images);
        let reference = req.manifest_digest.clone().unwrap_or_else(|| repo.image.manifest_reference().to_string());
        let book = self.clone();
        self.runtime.spawn(async move { book.look_up(img, reference).await });
    }

    /// Stops `st`'s recording, if one runs.
    fn stop_recording(&self, st: &mut ImageState) {
        if st.recorder.take().is_some() {
            self.recording.fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn look_up(self: Arc<Self>, img: Arc<ImageProfile>, reference: String) {
        let (fetched, manifest) = match img.repo.get_image_manifest(&reference, &Platform::default()).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(image = %img.image_ref, error = %e, "cannot resolve the image manifest; no access profile is used or recorded");
                let mut st = img.state.lock();
                self.stop_recording(&mut st);
                st.lookup = Lookup::Absent;
                return;
            }
        };
        let digest = fetched.digest.clone();
        let layers: HashSet<String> = {
            let mut st = img.state.lock();
            st.subject = Some(Subject::from(&fetched));
            st.layers.extend(manifest.layers().iter().map(|l| l.digest().to_string()));
            st.layers.clone()
        };
        let found = self.find(&img, &digest, &layers).await;
        let mut st = img.state.lock();
        match found {
            Some(profile) => {
                self.stop_recording(&mut st);
                let profile = Arc::new(profile);
                st.lookup = Lookup::Found(profile.clone());
                let caches: Vec<Arc<SpanCache>> = {
                    let caches = self.caches.lock();
                    st.layers.iter().filter_map(|l| caches.get(l)?.upgrade()).collect()
                };
                for cache in caches {
                    self.replay_layer(&img.image_ref, &mut st, &profile, &cache);
                }
            }
            None => st.lookup = Lookup::Absent,
        }
    }

    /// The image's profile: the stored one, else the newest usable one its registry lists.
    async fn find(&self, img: &ImageProfile, digest: &str, layers: &HashSet<String>) -> Option<AccessProfile> {
        let path = self.path(digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => match parse_for(&bytes, digest, layers) {
                Ok(p) => {
                    self.metrics.profile_event("found_local");
                    tracing::info!(image = %img.image_ref, reads = p.reads.len(), "access profile found in the profile store");
                    return Some(p);
                }
                Err(e) => {
                    self.metrics.profile_event("ignored");
                    tracing::warn!(image = %img.image_ref, path = %path.display(), error = %e, "stored access profile ignored and deleted");
                    let _ = tokio::fs::remove_file(&path).await;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read a stored access profile"),
        }
        let listed = match img.repo.referrers(digest, Some(PROFILE_ARTIFACT_TYPE)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(image = %img.image_ref, error = %e, "cannot list access profiles");
                return None;
            }
        };
        for d in listed.iter().rev() {
            let artifact = d.digest().to_string();
            match self.fetch(&img.repo, &artifact, digest, layers).await {
                Ok((p, bytes)) => {
                    self.metrics.profile_event("found_registry");
                    tracing::info!(image = %img.image_ref, %artifact, reads = p.reads.len(), "access profile found in the registry");
                    // Written (and synced) off the runtime's threads.
                    let dir = self.dir.clone();
                    let _ = tokio::task::spawn_blocking(move || keep(&dir, &path, &bytes)).await;
                    return Some(p);
                }
                Err(e) => {
                    self.metrics.profile_event("ignored");
                    tracing::warn!(image = %img.image_ref, %artifact, error = %e, "access profile ignored");
                }
            }
        }
        None
    }

    async fn fetch(
        &self,
        repo: &Repository,
        artifact: &str,
        digest: &str,
        layers: &HashSet<String>,
    ) -> Result<(AccessProfile, Bytes), ProfileFetchError> {
        let manifest = repo.get_manifest(artifact).await?;
        let blob = profile_blob(&manifest.bytes, digest)?;
        let bytes = repo.get_blob(&blob, MAX_PROFILE_BYTES).await?;
        Ok((parse_for(&bytes, digest, layers)?, bytes))
    }

    /// Queues the replay of `cache`'s layer's part of `profile`, once.
    fn replay_layer(&self, image: &str, st: &mut ImageState, profile: &AccessProfile, cache: &Arc<SpanCache>) {
        let Some(replayer) = &self.replayer else { return };
        if !st.replayed.insert(cache.layer().to_string()) {
            return;
        }
        let reads = profile.reads_of(cache.layer());
        if reads.is_empty() {
            return;
        }
        let (requests, foreign) = replayer.replay(cache, &reads);
        if foreign > 0 {
            tracing::warn!(%image, layer = %cache.layer(), foreign, "the access profile names spans this layer's index lacks; skipped");
        }
        tracing::info!(%image, layer = %cache.layer(), spans = reads.len(), requests, "replaying the access profile");
    }

    /// A layer was mounted (or served again): its part of any profile found is replayed.
    pub(crate) fn layer_mounted(&self, cache: &Arc<SpanCache>) {
        let layer = cache.layer().to_string();
        self.caches.lock().insert(layer.clone(), Arc::downgrade(cache));
        let images: Vec<Arc<ImageProfile>> = self.images.lock().values().cloned().collect();
        for img in images {
            let mut st = img.state.lock();
            if let Lookup::Found(p) = &st.lookup
                && st.layers.contains(&layer)
            {
                let p = p.clone();
                self.replay_layer(&img.image_ref, &mut st, &p, cache);
            }
        }
    }

    /// A layer's caches were deleted: a later mount of it replays again.
    pub(crate) fn layer_gone(&self, layer: &str) {
        self.caches.lock().remove(layer);
        for img in self.images.lock().values() {
            img.state.lock().replayed.remove(layer);
        }
    }

    /// Ends the recordings whose reads went quiet: kept and published when the image had no
    /// profile.
    fn tick(self: &Arc<Self>) {
        if self.recording.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = Instant::now();
        let images: Vec<Arc<ImageProfile>> = self.images.lock().values().cloned().collect();
        for img in images {
            let mut st = img.state.lock();
            let Some(recorder) = st.recorder.clone() else { continue };
            match recorder.status(now, self.quiet, self.limit) {
                Recording::Waiting if now.duration_since(st.created) > IDLE_LIMIT => {
                    self.stop_recording(&mut st);
                }
                Recording::Done if matches!(st.lookup, Lookup::Absent) => {
                    self.stop_recording(&mut st);
                    let Some(subject) = st.subject.clone() else { continue };
                    let (reads, took) = recorder.reads();
                    let reads = reads.iter().filter(|(l, _)| st.layers.contains(&**l)).map(|(l, s)| (&**l, *s));
                    let profile = AccessProfile::from_reads(&subject.digest, reads, took.as_millis() as u64);
                    if profile.reads.is_empty() {
                        continue;
                    }
                    st.lookup = Lookup::Found(Arc::new(profile.clone()));
                    drop(st);
                    self.recorded(&img, subject, &profile);
                }
                _ => {}
            }
        }
    }

    fn recorded(self: &Arc<Self>, img: &Arc<ImageProfile>, subject: Subject, profile: &AccessProfile) {
        self.metrics.profile_event("recorded");
        tracing::info!(image = %img.image_ref, reads = profile.reads.len(), layers = profile.layers.len(), ms = profile.recorded_ms, "access profile recorded");
        let bytes = profile.to_json();
        let path = self.path(&subject.digest);
        keep(&self.dir, &path, &bytes);
        if !self.publish {
            return;
        }
        let (book, img) = (self.clone(), img.clone());
        self.runtime.spawn(async move {
            let published =
                img.repo.push_artifact(&subject, PROFILE_ARTIFACT_TYPE, PROFILE_MEDIA_TYPE, Bytes::from(bytes)).await;
            match published {
                Ok(artifact) => {
                    book.metrics.profile_event("published");
                    tracing::info!(image = %img.image_ref, %artifact, "access profile published");
                }
                Err(e) => {
                    book.metrics.profile_event("publish_failed");
                    tracing::info!(image = %img.image_ref, error = %e, "access profile not published (it is kept on this node)");
                }
            }
        });
    }
}

/// Keeps a profile in the profile store `dir` as `path` (a failure is logged: the profile is
/// then fetched again next time).
fn keep(dir: &std::path::Path, path: &std::path::Path, bytes: &[u8]) {
    let kept = std::fs::create_dir_all(dir)
        .and_then(|()| clip_fsutil::atomic_write(path, bytes, 0o600, clip_fsutil::Durability::Durable));
    if let Err(e) = kept {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the access profile");
    }
}

impl ReadObserver for ProfileBook {
    fn read(&self, layer: &Arc<str>, spans: std::ops::RangeInclusive<u32>) {
        if self.recording.load(Ordering::Relaxed) == 0 {
            return;
        }
        for img in self.images.lock().values() {
            let st = img.state.lock();
            if let Some(r) = &st.recorder
                && st.layers.contains(&**layer)
            {
                r.note(layer, spans.clone());
            }
        }
    }
}
