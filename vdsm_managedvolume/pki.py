"""TLS for the agent: vdsm's PKI in production, a development PKI otherwise.

The engine talks to vdsm over *mutual* TLS: the host presents
``vdsmcert.pem`` and requires a client certificate signed by ``cacert.pem``
(the engine's CA).  On a vdsm host the agent simply uses those files
(``config``: key_file, cert_file, ca_file).

With ``--state-dir DIR`` (``make run``, tests, CI) there is no engine CA, so
``ensure_dev_pki`` creates one under ``DIR/pki`` when files are missing::

    cacert.pem / cakey.pem        the development CA
    vdsmcert.pem / vdsmkey.pem    server: localhost, 127.0.0.1, ::1
    client-cert.pem / client-key.pem   a client (managedvolume-client,
                                  tests, benchmarks)

Keys are written 0600 (never through a link planted at the temporary
name), certificates 0644, the directory is 0700.  Everything is signed by
the CA, so a client certificate from any other CA is refused at the
handshake.  The server accepts TLS 1.2 and later only, without compression
(CRIME) or renegotiation (a cheap way to make the server do expensive
handshakes), with Python's default cipher list.
"""

import datetime
import ipaddress
import os
import ssl

from . import fileutil

CA_CERT = "cacert.pem"
CA_KEY = "cakey.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 3650


def pki_dir(cfg):
    """Where the development PKI lives (None without a state dir)."""
    if not cfg.state_dir:
        return None
    return os.path.join(cfg.state_dir, "pki")


def client_files(cfg):
    """(cert_file, key_file, ca_file) of the development client."""
    d = pki_dir(cfg) or os.path.dirname(cfg.ca_file)
    return (os.path.join(d, CLIENT_CERT), os.path.join(d, CLIENT_KEY),
            cfg.ca_file)


def ensure_dev_pki(cfg):
    """Create the development CA, server and client files that are missing.

    Uses the config's key_file / cert_file / ca_file for the server (under
    ``<state_dir>/pki`` after ``config.with_state_dir``).  Existing files
    are kept, so a restart keeps the certificates clients already trust.
    When the CA has to be created, every certificate is re-issued.  Files
    configured elsewhere (a real PKI) are never created or replaced:
    then nothing is done.  Return whether the development PKI is in use.
    """
    d = pki_dir(cfg)
    if d is None:
        raise ValueError("a development PKI needs a state dir")
    if not all(os.path.dirname(os.path.abspath(path)) == d
               for path in (cfg.key_file, cfg.cert_file, cfg.ca_file)):
        return False
    os.makedirs(d, mode=0o700, exist_ok=True)
    # The CA key signs anything: nobody but us may even list the files.
    os.chmod(d, 0o700)
    ca_key_file = os.path.join(os.path.dirname(cfg.ca_file), CA_KEY)
    client_cert, client_key, _ = client_files(cfg)
    if os.path.exists(cfg.ca_file) and os.path.exists(ca_key_file):
        ca_key, ca_cert = load_ca(cfg.ca_file, ca_key_file)
        fresh_ca = False
    else:
        ca_key, ca_cert = create_ca()
        write_key(ca_key_file, ca_key)
        write_cert(cfg.ca_file, ca_cert)
        fresh_ca = True
    if fresh_ca or not (os.path.exists(cfg.cert_file) and
                        os.path.exists(cfg.key_file)):
        key, cert = create_cert(ca_key, ca_cert, "localhost",
                                names=SERVER_NAMES, server=True)
        write_key(cfg.key_file, key)
        write_cert(cfg.cert_file, cert)
    if fresh_ca or not (os.path.exists(client_cert) and
                        os.path.exists(client_key)):
        key, cert = create_cert(ca_key, ca_cert, "managedvolume-client",
                                server=False)
        write_key(client_key, key)
        write_cert(client_cert, cert)
    return True


def server_context(cfg):
    """An SSLContext requiring a client certificate signed by the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No TLS 1.3 session tickets.  They are records sent after the
    # handshake, and ovirt-engine's client decodes one record per reactor
    # round, so they delayed its first reply; it keeps its connection for
    # hours and gains nothing from resuming.  TLS 1.2 (the engine's
    # default) is unaffected.  Measured in docs/interop.md.
    ctx.num_tickets = 0
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    ctx.load_verify_locations(cfg.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_file, cert_file=None, key_file=None,
                   check_hostname=True):
    """An SSLContext trusting ``ca_file`` and presenting the client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(ca_file)
    ctx.check_hostname = check_hostname
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def dev_client_context(cfg):
    """The client context of the development PKI (tests, benchmarks)."""
    cert, key, ca = client_files(cfg)
    return client_context(ca, cert, key)


# Building blocks (tests use them to make a foreign CA).

def create_ca(name="vdsm-managedvolume development CA"):
    """Return (key, certificate) of a new self-signed CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                       critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(
            key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def create_cert(ca_key, ca_cert, common_name, names=(), server=True):
    """Return (key, certificate) signed by the CA.

    names: DNS names and IP addresses for the subjectAltName.
    server: serverAuth usage, else clientAuth.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([
            ExtendedKeyUsageOID.SERVER_AUTH if server
            else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    if names:
        sans = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans),
                                        critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def load_ca(cert_file, key_file):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(key_file, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return key, cert


def write_key(path, key):
    """Write a private key, readable by its owner only (0600)."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write(path, data, 0o600)


def write_cert(path, cert):
    from cryptography.hazmat.primitives import serialization

    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


# Private helpers

def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path, data, mode):
    """Write atomically with ``mode`` from the start (no readable window)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    fileutil.rm_file(tmp)   # a leftover, or a link planted to steal a key
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                 os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
