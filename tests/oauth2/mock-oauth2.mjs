// The authorization server for inboxd's OAuth2 tests: oauth2-mock-server (a real OAuth2
// implementation that signs RS256 JWTs and serves JWKS) behind a thin policy wrapper that adds
// what the package lacks for IMAP tests:
//   - client authentication: client secrets (HTTP Basic or form), and private_key_jwt client
//     assertions verified against the client's registered certificate (PS256 + x5t#S256, or
//     RS256 + x5t);
//   - the JWT bearer grant (RFC 7523) for service accounts, verified against the registered key;
//   - refresh tokens that are tracked, rotated on every use and rejected once used or revoked;
//   - `sub` and `email` claims naming the mailbox user, so Dovecot can match the IMAP user;
//   - test controls: token lifetime, injected failures, counters.
//
// Usage: node mock-oauth2.mjs CONFIG.json
// CONFIG: { "port": 0, "keys_dir": "...", "ttl": 3600,
//           "clients": { "alice": { "secret": "s", "user": "alice" },
//                        "app": { "certificate": "cert.pem", "user": "bob" } },
//           "service_accounts": { "sa@x": { "public_key": "sa.pub.pem" } },
//           "refresh_tokens": { "rt-1": "carol" } }
// Prints "READY <port>" on stdout when it listens.
//
// Test endpoints: POST /test/fail-next?status=503&count=N&error=temporarily_unavailable,
// POST /test/ttl?seconds=N, POST /test/revoke?token=T, GET /test/stats.

import http from 'node:http';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { OAuth2Server } from 'oauth2-mock-server';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const clients = config.clients ?? {};
const serviceAccounts = config.service_accounts ?? {};
const refreshTokens = new Map(Object.entries(config.refresh_tokens ?? {}));
let ttl = config.ttl ?? 3600;
let failNext = { count: 0, status: 503, error: 'temporarily_unavailable' };
const stats = { token_requests: 0, tokens_issued: 0, failures_injected: 0, rejected: 0 };
const seenAssertions = new Set();

const inner = new OAuth2Server();
const key = await inner.issuer.keys.generate('RS256');
await inner.start(0, '127.0.0.1');
const innerUrl = inner.issuer.url;

// The signer: sub/email/lifetime come from the wrapper through private form fields.
inner.service.on('beforeTokenSigning', (token, req) => {
  const user = req.body.x_user;
  const seconds = Number(req.body.x_ttl);
  token.payload.sub = user;
  token.payload.email = user;
  token.payload.iss = publicUrl;
  token.payload.exp = token.payload.iat + seconds;
  if (req.body.x_client) token.payload.azp_client = req.body.x_client;
  if (req.body.x_scope) token.payload.scp = req.body.x_scope;
  token.payload.aud = 'imap';
});

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

function decodeJwt(jwt) {
  const parts = String(jwt).split('.');
  if (parts.length !== 3) throw new Error('not a JWT');
  return {
    header: JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8')),
    payload: JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8')),
    signed: Buffer.from(`${parts[0]}.${parts[1]}`),
    signature: Buffer.from(parts[2], 'base64url'),
  };
}

function verifyJwt(jwt, publicKey, allowed) {
  const t = decodeJwt(jwt);
  const alg = t.header.alg;
  if (!allowed.includes(alg)) throw new Error(`algorithm ${alg} not allowed`);
  const opts = { key: publicKey };
  if (alg === 'PS256') {
    opts.padding = crypto.constants.RSA_PKCS1_PSS_PADDING;
    opts.saltLength = 32;
  }
  if (!crypto.verify('sha256', t.signed, opts, t.signature)) throw new Error('bad signature');
  const now = Math.floor(Date.now() / 1000);
  if (typeof t.payload.exp !== 'number' || t.payload.exp < now) throw new Error('assertion expired');
  if (t.payload.exp > now + 3700) throw new Error('assertion lives too long');
  if (t.payload.aud !== publicUrl + '/token') throw new Error(`wrong aud ${t.payload.aud}`);
  return t;
}

function certOf(file) {
  const pem = fs.readFileSync(file, 'utf8');
  const x509 = new crypto.X509Certificate(pem);
  return {
    publicKey: x509.publicKey,
    x5tS256: b64url(crypto.createHash('sha256').update(x509.raw).digest()),
    x5t: b64url(crypto.createHash('sha1').update(x509.raw).digest()),
  };
}

function oauthError(res, status, error, description) {
  stats.rejected += 1;
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify({ error, error_description: description }));
}

// Who the client is, or an error string.
function authenticateClient(req, form) {
  let id = form.get('client_id');
  let secret = form.get('client_secret');
  const auth = req.headers.authorization;
  if (auth && auth.startsWith('Basic ')) {
    const raw = Buffer.from(auth.slice(6), 'base64').toString('utf8');
    const i = raw.indexOf(':');
    id = decodeURIComponent(raw.slice(0, i));
    secret = decodeURIComponent(raw.slice(i + 1));
  }
  const assertion = form.get('client_assertion');
  if (assertion) {
    if (form.get('client_assertion_type') !== 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer') {
      return { error: 'invalid_client', description: 'unsupported client_assertion_type' };
    }
    let t;
    try {
      t = decodeJwt(assertion);
    } catch (e) {
      return { error: 'invalid_client', description: e.message };
    }
    id = id ?? t.payload.iss;
    const client = clients[id];
    if (!client || !client.certificate) return { error: 'invalid_client', description: `unknown client ${id}` };
    const cert = certOf(client.certificate);
    try {
      verifyJwt(assertion, cert.publicKey, ['PS256', 'RS256']);
    } catch (e) {
      return { error: 'invalid_client', description: `client assertion: ${e.message}` };
    }
    if (t.header['x5t#S256'] !== cert.x5tS256 && t.header.x5t !== cert.x5t) {
      return { error: 'invalid_client', description: 'client assertion: thumbprint does not match the registered certificate' };
    }
    if (t.payload.iss !== id || t.payload.sub !== id) return { error: 'invalid_client', description: 'iss/sub must be the client_id' };
    if (!t.payload.jti || seenAssertions.has(t.payload.jti)) return { error: 'invalid_client', description: 'jti missing or replayed' };
    seenAssertions.add(t.payload.jti);
    return { id, client };
  }
  const client = clients[id];
  if (!client || client.secret === undefined || client.secret !== secret) {
    return { error: 'invalid_client', description: 'client authentication failed' };
  }
  return { id, client };
}

async function mint(user, clientId, scope) {
  const body = new URLSearchParams({ grant_type: 'client_credentials', x_user: user, x_ttl: String(ttl), x_client: clientId ?? '', x_scope: scope ?? '' });
  const r = await fetch(innerUrl + '/token', { method: 'POST', body, headers: { 'content-type': 'application/x-www-form-urlencoded' } });
  if (!r.ok) throw new Error(`inner token endpoint: ${r.status}`);
  const j = await r.json();
  stats.tokens_issued += 1;
  return { access_token: j.access_token, token_type: 'Bearer', expires_in: ttl, scope };
}

async function token(req, res, form) {
  stats.token_requests += 1;
  if (failNext.count > 0) {
    failNext.count -= 1;
    stats.failures_injected += 1;
    return oauthError(res, failNext.status, failNext.error, 'injected failure');
  }
  const grant = form.get('grant_type');
  const scope = form.get('scope') ?? undefined;
  if (grant === 'urn:ietf:params:oauth:grant-type:jwt-bearer') {
    let t;
    try {
      t = decodeJwt(form.get('assertion'));
      const sa = serviceAccounts[t.payload.iss];
      if (!sa) return oauthError(res, 401, 'invalid_client', `unknown service account ${t.payload.iss}`);
      verifyJwt(form.get('assertion'), crypto.createPublicKey(fs.readFileSync(sa.public_key, 'utf8')), ['RS256']);
    } catch (e) {
      return oauthError(res, 400, 'invalid_grant', e.message);
    }
    if (!t.payload.sub) return oauthError(res, 400, 'invalid_grant', 'sub (the mailbox user) is required');
    if (!String(t.payload.scope ?? '').split(' ').includes('mail')) return oauthError(res, 400, 'invalid_scope', 'scope must include mail');
    return send(res, await mint(t.payload.sub, t.payload.iss, t.payload.scope));
  }
  if (grant === 'refresh_token') {
    const rt = form.get('refresh_token');
    const user = refreshTokens.get(rt);
    if (!user) return oauthError(res, 400, 'invalid_grant', 'unknown, used or revoked refresh token');
    refreshTokens.delete(rt);
    const next = 'rt-' + crypto.randomUUID();
    refreshTokens.set(next, user);
    return send(res, { ...(await mint(user, form.get('client_id'), scope)), refresh_token: next });
  }
  if (grant === 'client_credentials') {
    const who = authenticateClient(req, form);
    if (who.error) return oauthError(res, 401, who.error, who.description);
    return send(res, await mint(who.client.user ?? who.id, who.id, scope));
  }
  return oauthError(res, 400, 'unsupported_grant_type', `grant ${grant}`);
}

function send(res, body) {
  res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

const front = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    try {
      const url = new URL(req.url, publicUrl);
      const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
      if (req.method === 'POST' && url.pathname === '/token') return await token(req, res, form);
      if (url.pathname === '/test/fail-next') {
        failNext = { count: Number(url.searchParams.get('count') ?? 1), status: Number(url.searchParams.get('status') ?? 503), error: url.searchParams.get('error') ?? 'temporarily_unavailable' };
        return send(res, failNext);
      }
      if (url.pathname === '/test/ttl') {
        ttl = Number(url.searchParams.get('seconds'));
        return send(res, { ttl });
      }
      if (url.pathname === '/test/revoke') {
        refreshTokens.delete(url.searchParams.get('token'));
        return send(res, { revoked: true });
      }
      if (url.pathname === '/test/stats') return send(res, { ...stats, refresh_tokens: refreshTokens.size });
      if (url.pathname === '/jwks' || url.pathname.startsWith('/.well-known/')) {
        const r = await fetch(innerUrl + url.pathname);
        return send(res, await r.json());
      }
      res.writeHead(404);
      res.end();
    } catch (e) {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'server_error', error_description: String(e && e.message) }));
    }
  });
});

front.listen(config.port ?? 0, '127.0.0.1');
await new Promise((r) => front.once('listening', r));
const port = front.address().port;
const publicUrl = `http://127.0.0.1:${port}`;

// Dovecot's local JWT validation reads the public key from a dict laid out as
// <dir>/default/RS256/<kid> (see its oauth2 passdb, local_validation_key_dict = fs:posix).
const keyDir = path.join(config.keys_dir, 'default', 'RS256');
fs.mkdirSync(keyDir, { recursive: true });
const pub = crypto.createPublicKey({ key: key.toJSON ? key.toJSON() : key, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
fs.writeFileSync(path.join(keyDir, key.kid), pub);
for (const d of [config.keys_dir, path.join(config.keys_dir, 'default'), keyDir]) fs.chmodSync(d, 0o755);
fs.chmodSync(path.join(keyDir, key.kid), 0o644);

process.stdout.write(`READY ${port} ${key.kid}\n`);
process.on('SIGTERM', () => process.exit(0));
