//! Where a listener's socket comes from: inherited from systemd (socket activation), or bound
//! here, optionally with SO_REUSEPORT.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};

use tokio::net::{TcpListener, TcpSocket};

use crate::config;

/// The accept queue length asked of the kernel; what tokio's `TcpListener::bind` uses too
/// (Linux caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

/// A listener's socket, and whether it was inherited rather than bound.
pub struct Socket {
    pub listener: TcpListener,
    pub inherited: bool,
}

/// The first fd of socket activation (after stdin, stdout, stderr).
const FIRST_FD: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket activation: {variable}={value:?} is not a number")]
    NotANumber {
        variable: &'static str,
        value: String,
    },
    #[error("socket activation: LISTEN_FDNAMES has {names} name(s) for LISTEN_FDS={fds}")]
    Names { names: usize, fds: usize },
    #[error("socket activation: fd {fd} is not a listening TCP socket: {problem}")]
    NotListening { fd: RawFd, problem: &'static str },
    #[error("socket activation: fd {fd}")]
    Fd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
}

/// The sockets systemd passed this process, until listeners claim them.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<Passed>,
}

#[derive(Debug)]
struct Passed {
    fd: RawFd,
    name: Option<String>,
    address: SocketAddr,
    socket: std::net::TcpListener,
}

impl Inherited {
    /// Takes ownership of the sockets that `LISTEN_FDS`/`LISTEN_PID` pass to this process,
    /// and removes those variables.
    pub fn from_env() -> Result<Inherited, Error> {
        let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        let passed = passed(
            std::process::id(),
            pid.as_deref(),
            fds.as_deref(),
            names.as_deref(),
        )?;
        if passed.is_none() {
            // Absent, or meant for another process (our parent): not ours to touch.
            return Ok(Inherited::default());
        }
        // Removed so that nothing after us sees them: a child would read fds it does not
        // have, and a second call here would take ownership of the same fds twice. Safe to
        // call on edition 2021; the hazard that edition 2024 marks `unsafe` is C code reading
        // the environment on another thread at the same moment, and none runs yet: this is
        // the start of `Server::bind`, before any task, DNS lookup or upstream connect.
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
        let mut sockets = Vec::new();
        for (fd, name) in passed.into_iter().flatten() {
            // SAFETY: LISTEN_PID names this process, so systemd (or whoever speaks its
            // protocol) passed fds 3..3+LISTEN_FDS open and for us to own; nothing else in
            // wsgate uses them, and the variables are gone, so this runs once per fd.
            let socket = unsafe { socket2::Socket::from_raw_fd(fd) };
            match listening_address(fd, &socket) {
                Ok(address) => sockets.push(Passed {
                    fd,
                    name,
                    address,
                    socket: socket.into(),
                }),
                Err(err) => {
                    // Left open rather than closed: a wrong LISTEN_FDS can name an fd that is
                    // not open at all, and wsgate exits with this error anyway.
                    let _ = socket.into_raw_fd();
                    return Err(err);
                }
            }
        }
        Ok(Inherited { sockets })
    }

    /// The inherited socket for the listener `name` binding `bind`: the one systemd named
    /// after it (`FileDescriptorName=`), else one bound to exactly that address. systemd names
    /// every socket (by default after its unit), so a name no listener has is no match.
    pub fn take(&mut self, name: &str, bind: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self
            .sockets
            .iter()
            .position(|s| s.name.as_deref() == Some(name))
            .or_else(|| self.sockets.iter().position(|s| s.address == bind))?;
        Some(self.sockets.swap_remove(at).socket)
    }

    /// Warns about the sockets no listener claimed; they are closed here (systemd keeps its
    /// own copy), and what connects to them waits for nobody.
    pub fn warn_unclaimed(self) {
        for s in self.sockets {
            tracing::warn!(
                fd = s.fd,
                name = s.name.as_deref().unwrap_or(""),
                address = %s.address,
                "inherited socket matches no [[listener]] by name or bind address: closed"
            );
        }
    }
}

/// Checks that `fd` is what a listener can serve on, and makes it non-blocking for tokio.
fn listening_address(fd: RawFd, socket: &socket2::Socket) -> Result<SocketAddr, Error> {
    let failed = |source| Error::Fd { fd, source };
    let not_listening = |problem| Error::NotListening { fd, problem };
    if socket.r#type().map_err(failed)? != socket2::Type::STREAM {
        return Err(not_listening("not a stream socket"));
    }
    let address = socket
        .local_addr()
        .map_err(failed)?
        .as_socket()
        .ok_or_else(|| not_listening("not an IP socket"))?;
    #[cfg(target_os = "linux")]
    if !socket.is_listener().map_err(failed)? {
        return Err(not_listening("listen() was not called on it"));
    }
    socket.set_nonblocking(true).map_err(failed)?;
    Ok(address)
}

/// Each passed fd, with its `LISTEN_FDNAMES` name where set.
type FdNames = Vec<(RawFd, Option<String>)>;

/// The fds (with their names) that the socket activation variables pass to process `pid`:
/// `None` when they are absent or name another process.
fn passed(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
) -> Result<Option<FdNames>, Error> {
    let number = |variable, value: &str| {
        value.trim().parse::<u32>().map_err(|_| Error::NotANumber {
            variable,
            value: value.to_owned(),
        })
    };
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if number("LISTEN_PID", listen_pid)? != pid {
        return Ok(None);
    }
    let count = number("LISTEN_FDS", listen_fds)? as usize;
    let names: Vec<Option<String>> = match listen_fdnames {
        None => vec![None; count],
        Some(names) => {
            // As sd_listen_fds_with_names(3): one name per fd, ':'-separated.
            let names: Vec<_> = names.split(':').map(|n| Some(n.to_owned())).collect();
            if names.len() != count {
                return Err(Error::Names {
                    names: names.len(),
                    fds: count,
                });
            }
            names
        }
    };
    Ok(Some((FIRST_FD..).zip(names).collect()))
}

/// The socket `listener` serves on: inherited if systemd passed one for it, else bound.
pub fn listen(listener: &config::Listener, inherited: &mut Inherited) -> io::Result<Socket> {
    listen_at(
        &listener.name,
        listener.bind,
        listener.reuse_port,
        inherited,
    )
}

/// The socket named `name` (a listener's name, or `admin`) at `bind`: inherited, else bound.
pub fn listen_at(
    name: &str,
    bind_to: SocketAddr,
    reuse_port: bool,
    inherited: &mut Inherited,
) -> io::Result<Socket> {
    if let Some(socket) = inherited.take(name, bind_to) {
        return Ok(Socket {
            listener: TcpListener::from_std(socket)?,
            inherited: true,
        });
    }
    Ok(Socket {
        listener: bind(bind_to, reuse_port)?,
        inherited: false,
    })
}

fn bind(address: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As tokio's `TcpListener::bind` does: a restart can bind while the previous process's
    // connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if reuse_port {
        // Every socket in the group needs it, the running one too: that is why it is opt-in
        // per listener, set before the first process starts.
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> FdNames {
        (3..)
            .zip(names.iter().map(|n| Some(n.to_string())))
            .collect()
    }

    #[test]
    fn only_variables_naming_this_process_pass_sockets() {
        assert_eq!(passed(42, None, None, None).unwrap(), None);
        assert_eq!(passed(42, Some("42"), None, None).unwrap(), None);
        assert_eq!(passed(42, None, Some("2"), None).unwrap(), None);
        // Meant for another process, e.g. the shell that started us.
        assert_eq!(passed(42, Some("41"), Some("2"), None).unwrap(), None);
        assert_eq!(
            passed(42, Some("42"), Some("0"), None).unwrap(),
            Some(vec![])
        );
        assert_eq!(
            passed(42, Some("42"), Some("2"), None).unwrap(),
            Some(vec![(3, None), (4, None)])
        );
    }

    #[test]
    fn names_split_on_colons_one_per_fd() {
        assert_eq!(
            passed(7, Some("7"), Some("3"), Some("http:https:wsgate.socket")).unwrap(),
            Some(named(&["http", "https", "wsgate.socket"]))
        );
        // An empty name is a name (systemd allows it), not a missing one.
        assert_eq!(
            passed(7, Some("7"), Some("2"), Some(":admin")).unwrap(),
            Some(named(&["", "admin"]))
        );
        let err = passed(7, Some("7"), Some("3"), Some("http:https")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "socket activation: LISTEN_FDNAMES has 2 name(s) for LISTEN_FDS=3"
        );
    }

    #[test]
    fn garbage_is_an_error_naming_the_variable() {
        let err = passed(7, Some("seven"), Some("1"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "socket activation: LISTEN_PID=\"seven\" is not a number"
        );
        let err = passed(7, Some("7"), Some("-1"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "socket activation: LISTEN_FDS=\"-1\" is not a number"
        );
    }

    #[test]
    fn a_listener_takes_its_named_socket_first_then_one_at_its_address() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let passed = |fd, name: &str, address, socket| Passed {
            fd,
            name: Some(name.to_owned()),
            address,
            socket,
        };
        let mut inherited = Inherited {
            sockets: vec![
                passed(3, "wsgate.socket", a_addr, a),
                passed(4, "web", b_addr, b),
            ],
        };
        // By name, even though the listener's bind is somewhere else.
        let web = inherited
            .take("web", "192.0.2.1:80".parse().unwrap())
            .unwrap();
        assert_eq!(web.local_addr().unwrap(), b_addr);
        assert!(inherited
            .take("other", "192.0.2.1:80".parse().unwrap())
            .is_none());
        // By address, the unit's default name matching no listener.
        let http = inherited.take("http", a_addr).unwrap();
        assert_eq!(http.local_addr().unwrap(), a_addr);
        assert!(inherited.sockets.is_empty());
    }
}
