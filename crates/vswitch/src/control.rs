//! The control socket: one JSON request per line, one JSON answer per line
//! (protocol in docs/cli.md).
//!
//! The socket is an input like any other: requests are bounded in size, idle
//! connections time out, concurrent connections are capped, and a malformed
//! request gets an error answer, never a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::clock::Timestamp;
use crate::daemon::Daemon;

/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/vswitch/vswitchd.sock";
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
const MAX_CONNECTIONS: usize = 32;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Ports, networks, counters.
    Show {},
    /// MAC tables.
    Fdb {
        /// `tenant/network` or a unique network name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
    },
    /// Re-read the config file.
    Reload {},
    /// DHCP leases.
    Leases {
        /// `tenant/network` or a network name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
    },
    /// Tracked connections (NAT's and the security groups' tables).
    Conntrack {
        /// Only connections of this tenant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        /// Only connections charged to this port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<String>,
    },
    /// Every counter: ports, peers, security-group rules, NAT pools.
    Stats {},
    /// Graceful restart: save connections, keep taps, exit (a supervisor
    /// or the operator starts vswitchd again, which restores them).
    Restart {},
    /// Load balancers: VIPs, backends' health, weights, connections.
    Lb {},
    /// Forget a port's tracked connections.
    ConntrackFlush {
        /// The port.
        port: String,
    },
    /// Security groups: rules with hit counters, filtered ports.
    Sg {
        /// Only this port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<String>,
    },
    /// This host's uplink, NAT rules, mappings and counters.
    Nat {},
    /// Packet trace from a port: a synthetic `flow` walked through the
    /// pipeline as a dry run, or (`live`) the next real packets.
    Trace {
        /// Port name (a VM's port or the uplink).
        port: String,
        /// The synthetic packet, e.g. `tcp 10.0.1.10:40000 > 10.0.2.20:80`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flow: Option<String>,
        /// Trace this many real packets instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<u64>,
        /// Live: only packets matching this filter (capture syntax).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
        /// Live: wait at most this many seconds (default 10, at most 60).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
    /// Packet capture at a port: after the answer line the connection
    /// carries a pcapng stream until `count` frames were sent or the client
    /// closes it.
    Capture {
        /// Port name (optional for the underlay and uplink stages).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<String>,
        /// Stages: any of "rx", "tx", "drop" (default all three); or
        /// "underlay" (VXLAN datagrams, for one port's frames when a port
        /// is named) or "uplink" (the uplink port), each alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stages: Option<Vec<String>>,
        /// Filter in the documented tcpdump subset (docs/cli.md).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
        /// Stop after this many frames.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
        /// Bytes kept per frame (default 262144).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snaplen: Option<u32>,
    },
}

/// Answers one request line.
pub fn handle_line(daemon: &Daemon, line: &[u8]) -> Value {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return json!({"ok": false, "error": format!("bad request: {e}; expected e.g. {{\"cmd\":\"show\"}}")})
        }
    };
    let result = match req {
        Request::Show {} => Ok(daemon.show()),
        Request::Fdb { network } => daemon.fdb(network.as_deref(), Timestamp::now()),
        Request::Leases { network } => Ok(daemon.leases(network.as_deref())),
        Request::Conntrack { tenant, port } => {
            daemon.conntrack(tenant.as_deref(), port.as_deref(), Timestamp::now())
        }
        Request::ConntrackFlush { port } => daemon.conntrack_flush(&port),
        Request::Stats {} => Ok(daemon.stats()),
        // The connection handler asks for the restart once this answer is
        // written: asking here would race the daemon's exit with the reply.
        Request::Restart {} => Ok(json!({"restarting": true})),
        Request::Sg { port } => daemon.sg(port.as_deref()),
        Request::Nat {} => Ok(daemon.nat()),
        Request::Lb {} => Ok(daemon.lb()),
        Request::Reload {} => daemon
            .reload()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
        Request::Trace {
            port,
            flow,
            live,
            filter,
            timeout,
        } => match (flow, live) {
            (Some(f), None) if filter.is_none() => daemon.trace(&port, &f),
            (None, Some(n)) => daemon.trace_live(
                &port,
                n,
                filter.as_deref(),
                Duration::from_secs(timeout.unwrap_or(10)),
            ),
            (Some(_), None) => Err("a filter is for live traces (--live N)".into()),
            (Some(_), Some(_)) => {
                Err("give either a flow to walk or --live N real packets, not both".into())
            }
            (None, None) => {
                Err("give a flow, e.g. 'tcp 10.0.1.10:40000 > 10.0.2.20:80', or --live N".into())
            }
        },
        Request::Capture { .. } => Err("capture streams; it is handled by the connection".into()),
    };
    match result {
        Ok(data) => json!({"ok": true, "data": data}),
        Err(error) => json!({"ok": false, "error": error}),
    }
}

/// Binds the socket, refusing to steal one a live daemon listens on.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by a running vswitchd; stop it or pass --socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("too many control connections; refusing one");
            let mut s = stream;
            let _ = s
                .write_all(b"{\"ok\":false,\"error\":\"too many control connections\"}\n")
                .await;
            continue;
        };
        let d = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, d).await {
                tracing::debug!(error = %e, "control connection ended");
            }
            drop(permit);
        });
    }
}

async fn connection(stream: UnixStream, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut r).take(MAX_REQUEST as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(IDLE_TIMEOUT, read).await {
            Ok(res) => res?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST {
            let msg =
                json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")});
            w.write_all(format!("{msg}\n").as_bytes()).await?;
            return Ok(());
        }
        if let Ok(Request::Capture {
            port,
            stages,
            filter,
            count,
            snaplen,
        }) = serde_json::from_slice::<Request>(&line)
        {
            let spec = CaptureSpec {
                port,
                stages,
                filter,
                count,
                snaplen,
            };
            return stream_capture(&daemon, spec, r, w).await;
        }
        let restart = matches!(
            serde_json::from_slice::<Request>(&line),
            Ok(Request::Restart {})
        );
        let d = daemon.clone();
        let req = std::mem::take(&mut line);
        // Reload creates taps and reads files: keep it off the async threads.
        let answer = tokio::task::spawn_blocking(move || handle_line(&d, &req))
            .await
            .unwrap_or_else(|e| json!({"ok": false, "error": format!("internal error: {e}")}));
        w.write_all(format!("{answer}\n").as_bytes()).await?;
        if restart {
            w.flush().await?;
            daemon.request_restart();
            return Ok(());
        }
    }
}

struct CaptureSpec {
    port: Option<String>,
    stages: Option<Vec<String>>,
    filter: Option<String>,
    count: Option<u64>,
    snaplen: Option<u32>,
}

/// Where a capture listens and what it takes.
struct CaptureTarget {
    /// Port name, or `underlay`.
    name: String,
    point: Arc<crate::capture::PortCapture>,
    stages: Vec<crate::capture::Stage>,
    /// Underlay capture for one port: its MAC and VNI.
    inner_port: Option<(packet::MacAddr, u32)>,
}

/// Resolves a capture request: a port's stages, the underlay (for one
/// port's frames when a port is named), or the uplink port.
fn capture_target(daemon: &Daemon, spec: &CaptureSpec) -> Result<CaptureTarget, String> {
    use crate::capture::Stage;
    if !cfg!(feature = "observe") {
        return Err(crate::daemon::NOT_OBSERVABLE.into());
    }
    let all = vec![Stage::Rx, Stage::Tx, Stage::Drop];
    let no_port = |p: &str| format!("no port {p:?} on this switch (vswitchctl show lists them)");
    let words: Vec<&str> = spec.stages.iter().flatten().map(String::as_str).collect();
    let alone = |w: &str| {
        if words.len() > 1 {
            Err(format!(
                "stage {w} is a capture point of its own: capture it alone (--stage {w})"
            ))
        } else {
            Ok(())
        }
    };
    if words.contains(&"underlay") {
        alone("underlay")?;
        let point = daemon.underlay_capture().ok_or(
            "this host has no underlay (the config has no other [[host]] to reach over VXLAN)",
        )?;
        let inner_port = match &spec.port {
            Some(p) => Some(daemon.port_mac_vni(p).ok_or_else(|| no_port(p))?),
            None => None,
        };
        return Ok(CaptureTarget {
            name: "underlay".into(),
            point,
            stages: all,
            inner_port,
        });
    }
    if words.contains(&"uplink") {
        alone("uplink")?;
        let name = daemon
            .uplink_port()
            .ok_or("this host has no uplink ([[uplink]] for this host in the config)")?;
        if spec.port.as_ref().is_some_and(|p| *p != name) {
            return Err(format!(
                "--stage uplink captures the uplink port {name:?}; leave out --port"
            ));
        }
        let point = daemon.capture_point(&name).ok_or_else(|| no_port(&name))?;
        return Ok(CaptureTarget {
            name,
            point,
            stages: all,
            inner_port: None,
        });
    }
    let Some(port) = &spec.port else {
        return Err("name the port to capture (--port P), or --stage underlay|uplink".into());
    };
    let stages: Vec<Stage> = if words.is_empty() {
        if spec.stages.is_some() {
            return Err("stages is empty; use rx, tx and/or drop".into());
        }
        all
    } else {
        words
            .iter()
            .map(|s| {
                Stage::parse(s).ok_or(format!(
                    "unknown stage {s:?}; use rx, tx, drop, underlay or uplink"
                ))
            })
            .collect::<Result<_, _>>()?
    };
    let point = daemon.capture_point(port).ok_or_else(|| no_port(port))?;
    Ok(CaptureTarget {
        name: port.clone(),
        point,
        stages,
        inner_port: None,
    })
}

/// Runs one capture session on the connection: the answer line, then
/// pcapng until the count is reached or the client goes away (a read of
/// EOF or a failed write ends it; the session is always detached).
async fn stream_capture(
    daemon: &Daemon,
    spec: CaptureSpec,
    mut r: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    use crate::capture::{write_pcapng_header, write_pcapng_record, Session, MAX_SNAPLEN};
    let fail = |e: String| json!({"ok": false, "error": e});
    let filter = match spec.filter.as_deref().map(crate::filter::Filter::parse) {
        None => Ok(None),
        Some(Ok(f)) => Ok(Some(f)),
        Some(Err(e)) => Err(format!("filter: {e}")),
    };
    let target = capture_target(daemon, &spec);
    let (target, filter) = match (target, filter) {
        (Ok(t), Ok(f)) => (t, f),
        (Err(e), _) | (_, Err(e)) => {
            w.write_all(format!("{}\n", fail(e)).as_bytes()).await?;
            return Ok(());
        }
    };
    let CaptureTarget {
        name,
        point,
        stages,
        inner_port,
    } = target;
    let snaplen = spec.snaplen.unwrap_or(MAX_SNAPLEN);
    let session = Session::new(&stages, snaplen, spec.count, filter);
    let session = Arc::new(match inner_port {
        Some((mac, vni)) => session.for_port_on_underlay(mac, vni),
        None => session,
    });
    if let Err(e) = point.attach(session.clone()) {
        w.write_all(format!("{}\n", fail(e)).as_bytes()).await?;
        return Ok(());
    }
    let result = async {
        let ok = json!({"ok": true, "data": {"format": "pcapng", "port": name, "snaplen": session.snaplen()}});
        w.write_all(format!("{ok}\n").as_bytes()).await?;
        let mut out = Vec::with_capacity(64 * 1024);
        write_pcapng_header(&name, session.snaplen(), &mut out);
        w.write_all(&out).await?;
        let mut scratch = [0u8; 512];
        loop {
            let records = session.drain();
            if !records.is_empty() {
                out.clear();
                for rec in &records {
                    write_pcapng_record(rec, &mut out);
                }
                w.write_all(&out).await?;
            }
            if session.done() {
                break;
            }
            tokio::select! {
                _ = session.notify.notified() => {}
                // The client closed (or sent something): stop.
                _ = r.read(&mut scratch) => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        // Whatever arrived before the count was reached.
        let rest = session.drain();
        out.clear();
        for rec in &rest {
            write_pcapng_record(rec, &mut out);
        }
        w.write_all(&out).await?;
        w.flush().await
    }
    .await;
    session.close();
    point.detach(&session);
    tracing::info!(port = %name, captured = session.captured.load(std::sync::atomic::Ordering::Relaxed),
        lost = session.lost.load(std::sync::atomic::Ordering::Relaxed), "capture ended");
    result
}

/// Opens a capture stream: sends `req` (a [`Request::Capture`]), checks the
/// answer line and returns the connection positioned at the pcapng bytes.
pub fn capture_stream(socket: &Path, req: &Request) -> Result<impl std::io::Read, ClientError> {
    use std::io::{BufRead, Write};
    let mut s =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| ClientError::Connect {
            socket: socket.to_path_buf(),
            source: e,
        })?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(ClientError::Io)?;
    let mut reader = std::io::BufReader::new(s);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(ClientError::Io)?;
    let v: Value =
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(reader)
    } else {
        Err(ClientError::Daemon(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }
}

/// Blocking client used by `vswitchctl` and tests: sends `req`, returns the
/// `data` on success or the daemon's error message.
pub fn request(socket: &Path, req: &Request) -> Result<Value, ClientError> {
    use std::io::{BufRead, Write};
    let mut s =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| ClientError::Connect {
            socket: socket.to_path_buf(),
            source: e,
        })?;
    // A live trace waits up to its own timeout (at most 60 s) for packets.
    let t = Some(Duration::from_secs(match req {
        Request::Trace { live: Some(_), .. } => 75,
        _ => 30,
    }));
    s.set_read_timeout(t).map_err(ClientError::Io)?;
    s.set_write_timeout(t).map_err(ClientError::Io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(ClientError::Io)?;
    let mut answer = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut answer)
        .map_err(ClientError::Io)?;
    let v: Value =
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v.get("data").cloned().unwrap_or(Value::Null))
    } else {
        Err(ClientError::Daemon(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_string(),
        ))
    }
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon at the socket.
    #[error("cannot reach vswitchd at {}: {source} (is it running? pass --socket if it uses another path)", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// I/O on the connection.
    #[error("control socket: {0}")]
    Io(std::io::Error),
    /// The answer was not what the protocol says.
    #[error("unexpected answer from vswitchd: {0}")]
    Protocol(String),
    /// The daemon answered with an error.
    #[error("{0}")]
    Daemon(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Show {}).unwrap(),
            r#"{"cmd":"show"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"fdb","network":"acme/web"}"#).unwrap(),
            Request::Fdb {
                network: Some("acme/web".into())
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"fdb"}"#).unwrap(),
            Request::Fdb { network: None }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"show","x":1}"#).is_err());
    }
}
