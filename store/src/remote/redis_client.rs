//! Redis, reached directly: one multiplexed connection per remote, every
//! request of the run pipelined on it.
//!
//! OpenDAL's Redis service takes a connection from a pool for each request
//! and checks it with a `PING` first: two round trips per read, and no more
//! reads in flight than connections in the pool. Here a `GET` is one round
//! trip, and as many as the run allows share the connection (Redis answers
//! them in order; the client matches answers to requests). The keys are
//! those OpenDAL uses (the path itself), so either reads what the other
//! wrote.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, ProtocolVersion,
    RedisConnectionInfo, RedisError,
};

pub(super) struct RedisClient {
    client: Client,
    config: AsyncConnectionConfig,
    /// The connection in use, if one is open.
    connection: Mutex<Option<MultiplexedConnection>>,
    /// Held while connecting, so the requests of a run open one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl RedisClient {
    /// A client of the server at `endpoint` (`redis://HOST:PORT` or
    /// `rediss://HOST:PORT`); connects on the first request.
    pub(super) fn new(
        endpoint: &str,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
        timeout: Duration,
    ) -> Result<RedisClient, String> {
        let url = url::Url::parse(endpoint).map_err(|e| e.to_string())?;
        let host = url.host_str().unwrap_or("127.0.0.1").to_string();
        let port = url.port().unwrap_or(6379);
        let addr = match url.scheme() {
            "rediss" => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        let mut settings = RedisConnectionInfo::default()
            .set_db(db)
            .set_protocol(ProtocolVersion::RESP2);
        if let Some(u) = username {
            settings = settings.set_username(u);
        }
        if let Some(p) = password {
            settings = settings.set_password(p);
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| e.to_string())?
            .set_redis_settings(settings);
        let client = Client::open(info).map_err(|e| e.to_string())?;
        Ok(RedisClient {
            client,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        if let Some(c) = self.connection.lock().unwrap().clone() {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.connection.lock().unwrap().clone() {
            return Ok(c);
        }
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(|e| describe(&e))?;
        *self.connection.lock().unwrap() = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection: the next request opens a new one (after an
    /// error that may have left it broken, or a request that timed out).
    pub(super) fn reset(&self) {
        *self.connection.lock().unwrap() = None;
    }

    /// The value of `key`, cut off past `limit` bytes (`GETRANGE`: a longer
    /// value comes back `limit + 1` bytes long): missing when there is none
    /// (or it is empty: no record is), not a record when the key holds
    /// another type (a list, a hash).
    pub(super) async fn get(&self, key: &str, limit: usize) -> Result<super::Fetch, String> {
        let mut c = self.connection().await?;
        let value = redis::cmd("GETRANGE")
            .arg(key)
            .arg(0)
            .arg(limit)
            .query_async::<Vec<u8>>(&mut c)
            .await;
        match value {
            Ok(value) if value.is_empty() => Ok(super::Fetch::Missing),
            Ok(value) => Ok(super::Fetch::Bytes(value)),
            Err(e) if e.code() == Some("WRONGTYPE") => Ok(super::Fetch::NotARecord(
                "a value that is not a string".into(),
            )),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Sets `key` to `value`.
    pub(super) async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
        let mut c = self.connection().await?;
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.failed(&e))
    }

    /// Describes a failed request, forgetting the connection unless the
    /// server answered the request with an error.
    fn failed(&self, e: &RedisError) -> String {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_unrecoverable_error()
        {
            self.reset();
        }
        describe(e)
    }
}

/// A short account of a Redis error, saying when the credentials were
/// refused.
fn describe(e: &RedisError) -> String {
    let text = e.to_string();
    let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
        || ["WRONGPASS", "NOAUTH", "NOPERM", "uthentication"]
            .iter()
            .any(|w| text.contains(w));
    let mut message = text.lines().next().unwrap_or("").to_string();
    if refused {
        message.push_str(" (credentials refused? check the remote's credentials)");
    }
    message
}
