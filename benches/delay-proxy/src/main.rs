//! A TCP proxy on loopback that adds a fixed latency to every request:
//! each chunk a client sends reaches the server DELAY_MS later, in order,
//! with any number of connections and requests in flight at once, as over a
//! long link. Answers go back at once. Used by `benches/remote.sh` to
//! measure the remote tier 20 ms away.
//!
//! ```text
//! delay-proxy LISTEN_PORT UPSTREAM_PORT DELAY_MS
//! ```
//!
//! LISTEN_PORT 0 takes a free port. Once listening, the proxy prints its
//! port on a line of stdout. It runs until killed.
//!
//! A workspace member of its own, depending on tokio alone, so that
//! changes to pycstore never rebuild it: `cargo build --release -p
//! pycstore-delay-proxy` (binary `delay-proxy`). One thread serves every
//! connection: the proxy costs little next to what it measures.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The size of one read from either side.
const CHUNK: usize = 64 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [listen, upstream, delay] => listen
            .parse::<u16>()
            .ok()
            .zip(upstream.parse::<u16>().ok())
            .zip(
                delay
                    .parse::<f64>()
                    .ok()
                    .filter(|d| *d >= 0.0 && d.is_finite()),
            ),
        _ => None,
    };
    let Some(((listen, upstream), delay_ms)) = parsed else {
        eprintln!("usage: delay-proxy LISTEN_PORT UPSTREAM_PORT DELAY_MS");
        return ExitCode::from(2);
    };
    let delay = Duration::from_secs_f64(delay_ms / 1000.0);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("delay-proxy: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, upstream, delay)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delay-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: u16, upstream: u16, delay: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
    let port = listener.local_addr()?.port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{port}")?;
        out.flush()?;
    }
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(relay(client, upstream, delay));
            }
            Err(e) => {
                // Out of descriptors, or a connection reset before it was
                // taken: wait a little and go on.
                eprintln!("delay-proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One connection: what the client sends is held `delay` before it goes
/// to the server (chunk by chunk, keeping their order and spacing); what
/// the server sends goes back at once.
async fn relay(client: TcpStream, upstream: u16, delay: Duration) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return; // the client sees its connection closed
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_in, mut client_out) = client.into_split();
    let (server_in, mut server_out) = server.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let requests_in = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            match client_in.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` lets the sender finish what is queued, then close.
    };
    let requests_out = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if server_out.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = server_out.shutdown().await;
    };
    let answers = async move {
        let mut server_in = BufReader::with_capacity(CHUNK, server_in);
        let _ = tokio::io::copy_buf(&mut server_in, &mut client_out).await;
        let _ = client_out.shutdown().await;
    };
    tokio::join!(requests_in, requests_out, answers);
}
