//! The built-in demo: a listener bound here is served from another process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use handover::{Channel, ChannelListener, Handle};

const WAIT: Duration = Duration::from_secs(10);

/// Binds, hands over, and checks the answer.
pub fn run() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a TCP listener")?;
    let addr = listener.local_addr()?;
    println!("[demo] bound {addr} in pid {}", std::process::id());

    let name = format!("handover-demo-{}", std::process::id());
    let channels = ChannelListener::bind_name(&name).context("binding the demo channel")?;
    let exe = std::env::current_exe().context("finding the handover executable")?;
    let mut child = Command::new(exe)
        .args(["demo-server", "--channel", &name])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the second process")?;

    let result = hand_over(&channels, listener, child.id(), addr);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for the second process")?;
    result?;
    ensure!(status.success(), "the second process failed: {status}");
    println!("[demo] done: the listener moved between processes and served a real request");
    Ok(())
}

fn hand_over(
    channels: &ChannelListener,
    listener: TcpListener,
    child_pid: u32,
    addr: std::net::SocketAddr,
) -> Result<()> {
    let channel = channels
        .accept_timeout(WAIT)
        .context("waiting for the second process to connect")?;
    let peer = channel.peer_credentials()?.pid();
    ensure!(
        peer == child_pid,
        "connected peer is pid {peer}, not our child {child_pid}"
    );
    channel.send(b"serve this", &[Handle::from(listener).with_name("http")])?;
    println!(
        "[demo] handed the listener to pid {peer} over a channel; this process no longer holds it"
    );

    let mut stream = TcpStream::connect(addr).context("connecting to the handed-over listener")?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading the HTTP response")?;
    let status_line = response.lines().next().unwrap_or_default();
    ensure!(
        status_line.starts_with("HTTP/1.1 200"),
        "unexpected response: {response:?}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    println!(
        "[demo] GET http://{addr}/ -> {status_line}: {}",
        body.trim()
    );
    Ok(())
}

/// The second process: fetch the listener and serve one request.
pub fn serve(channel_name: &str) -> Result<()> {
    let channel = Channel::connect_name(channel_name).context("connecting to the demo channel")?;
    let Some(mut message) = channel.recv_timeout(WAIT)? else {
        bail!("the first process closed the channel before sending anything");
    };
    let handle = message
        .take("http")
        .context("the message carries no handle named \"http\"")?;
    let from = channel.peer_credentials()?.pid();
    let listener = handle.into_tcp_listener()?;
    let (stream, peer) = listener.accept().context("accepting a connection")?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read the rest of the head so the client sees a clean close.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let body = format!(
        "served by pid {} through a listener received from pid {from}\n",
        std::process::id()
    );
    let mut stream = &stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    eprintln!("[demo-server] answered {} from {peer}", request_line.trim());
    Ok(())
}
