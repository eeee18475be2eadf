//! A PostgreSQL server of the test's own: `initdb` and `pg_ctl` in a temporary folder on a
//! free loopback port, run as the `postgres` OS user (PostgreSQL refuses to run as root),
//! stopped by the PID in its `postmaster.pid` when the test ends. `.ci/run` installs the
//! `postgresql` package; its binaries are looked up on the PATH, then in
//! `/usr/lib/postgresql/*/bin`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{free_port, TempDir};

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v pg_ctl"])
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !p.is_empty() {
            // Through symbolic links to the real folder (initdb finds its files from there).
            if let Ok(real) = std::fs::canonicalize(&p) {
                if let Some(d) = real.parent() {
                    return d.to_path_buf();
                }
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().expect(
        "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it): the cluster tests need it",
    )
}

/// Runs a PostgreSQL program as the `postgres` user.
fn as_postgres(bin: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    /// A fresh cluster, started and ready for connections.
    pub fn start() -> Postgres {
        Postgres::start_with(|_| {})
    }

    /// A fresh cluster that accepts TLS connections only (`hostssl` in pg_hba.conf), with a
    /// certificate for 127.0.0.1 signed by a CA made here; returns it and the CA's PEM.
    pub fn start_tls() -> (Postgres, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let pg = Postgres::start_with(|data| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            for f in ["server.crt", "server.key"] {
                let st = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(data.join(f))
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            let conf = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(&conf, text).unwrap();
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).unwrap().replace(
                "host    all             all             127.0.0.1/32",
                "hostssl all             all             127.0.0.1/32",
            );
            std::fs::write(&hba, text).unwrap();
        });
        (pg, ca_pem)
    }

    /// A fresh cluster; `prepare` edits its data folder before it starts.
    fn start_with(prepare: impl FnOnce(&Path)) -> Postgres {
        let bin = bin_dir();
        let dir = TempDir::new("pg");
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "chown of the PostgreSQL folder");
        let data = dir.path().join("data");
        let data_s = data.to_str().unwrap().to_owned();
        as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        prepare(&data);
        let pg = Postgres {
            dir,
            bin,
            port: free_port(),
        };
        pg.run();
        pg
    }

    /// Starts the server (again, after [`Postgres::stop`]) and waits until it accepts.
    pub fn run(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// The server's PID (first line of `postmaster.pid`), while it runs.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the server: SIGINT (fast shutdown) to its PID, then waits until it is gone.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        crate::harness::wait_until(
            || !Path::new(&format!("/proc/{pid}")).exists(),
            "PostgreSQL to stop",
        );
    }

    /// Runs SQL through `psql` (as the `postgres` user); its output without headers.
    pub fn sql(&self, statements: &str) -> String {
        let port = self.port.to_string();
        let out = as_postgres(
            &self.bin,
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                statements,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
