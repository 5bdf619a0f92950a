//! A TCP fault proxy between inboxd and Dovecot: freeze (application silence), reset, close,
//! delay, throttle, cut after N bytes, and accept-but-never-greet. A userspace proxy cannot make
//! a TCP-level blackhole (the kernel keeps ACKing); the half-open test uses nftables for that.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// EOF at once.
    Close,
    /// RST at once.
    Reset,
}

pub struct Ctl {
    frozen: watch::Sender<bool>,
    kill: broadcast::Sender<Kill>,
    delay_ms: AtomicU64,
    /// Bytes per second; 0 = unlimited.
    throttle: AtomicU64,
    /// Server-to-client bytes left before the connection is cut; negative = no cut.
    cut_budget: AtomicI64,
    hang: AtomicBool,
    pub accepted: AtomicU64,
}

#[derive(Clone)]
pub struct FaultProxy {
    pub port: u16,
    ctl: Arc<Ctl>,
}

impl FaultProxy {
    pub async fn start(target: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ctl = Arc::new(Ctl {
            frozen: watch::channel(false).0,
            kill: broadcast::channel(16).0,
            delay_ms: AtomicU64::new(0),
            throttle: AtomicU64::new(0),
            cut_budget: AtomicI64::new(-1),
            hang: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        let c = ctl.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = conn(client, target, c).await;
                });
            }
        });
        FaultProxy { port, ctl }
    }

    pub fn freeze(&self) {
        self.ctl.frozen.send_replace(true);
    }
    pub fn thaw(&self) {
        self.ctl.frozen.send_replace(false);
    }
    pub fn kill(&self, how: Kill) {
        let _ = self.ctl.kill.send(how);
    }
    pub fn delay(&self, ms: u64) {
        self.ctl.delay_ms.store(ms, Ordering::SeqCst);
    }
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.ctl.throttle.store(bytes_per_sec, Ordering::SeqCst);
    }
    pub fn cut_after(&self, bytes: i64) {
        self.ctl.cut_budget.store(bytes, Ordering::SeqCst);
    }
    pub fn hang(&self, on: bool) {
        self.ctl.hang.store(on, Ordering::SeqCst);
    }
    /// Connections accepted so far.
    pub fn accepted_count(&self) -> u64 {
        self.ctl.accepted.load(Ordering::SeqCst)
    }
    pub fn heal(&self) {
        self.thaw();
        self.delay(0);
        self.throttle(0);
        self.cut_after(-1);
        self.hang(false);
    }
}

async fn conn(client: TcpStream, target: u16, ctl: Arc<Ctl>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = client.as_raw_fd();
    let mut kill = ctl.kill.subscribe();
    if ctl.hang.load(Ordering::SeqCst) {
        // Accept, never greet: hold the socket until killed.
        let _ = kill.recv().await;
        return Ok(());
    }
    let upstream = TcpStream::connect(("127.0.0.1", target)).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = {
        let ctl = ctl.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                gate(&ctl, n).await;
                uw.write_all(&buf[..n]).await?;
            }
        }
    };
    let down = {
        let ctl = ctl.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = ur.read(&mut buf).await?;
                if n == 0 {
                    let _ = cw.shutdown().await;
                    return Ok::<_, std::io::Error>(cw);
                }
                gate(&ctl, n).await;
                let budget = ctl.cut_budget.load(Ordering::SeqCst);
                if budget >= 0 {
                    let take = (budget as usize).min(n);
                    ctl.cut_budget.fetch_sub(take as i64, Ordering::SeqCst);
                    cw.write_all(&buf[..take]).await?;
                    if take < n || budget as usize == take {
                        let _ = cw.shutdown().await;
                        return Ok(cw);
                    }
                    continue;
                }
                cw.write_all(&buf[..n]).await?;
            }
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        k = kill.recv() => {
            // The halves live inside the pinned futures until this function returns, so the
            // descriptor is still open here.
            // SAFETY: `fd` belongs to the client socket, which is alive until we return.
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            match k {
                Ok(Kill::Reset) => {
                    // Linger 0: the close that follows sends RST.
                    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                }
                _ => {
                    let _ = socket2::SockRef::from(&sock).shutdown(std::net::Shutdown::Both);
                }
            }
            Ok(())
        }
        _ = &mut up => Ok(()),
        r = &mut down => {
            if let Ok(mut cw) = r {
                let _ = cw.shutdown().await;
            }
            Ok(())
        }
    }
}

async fn gate(ctl: &Ctl, n: usize) {
    let mut frozen = ctl.frozen.subscribe();
    while *frozen.borrow() {
        if frozen.changed().await.is_err() {
            break;
        }
    }
    let delay = ctl.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let rate = ctl.throttle.load(Ordering::SeqCst);
    if rate > 0 {
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
    }
}
