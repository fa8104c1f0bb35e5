package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// firstServiceIP is the first address of --service-cluster-ip-range: the API server
// gives it to the "kubernetes" Service, so the serving certificate must name it. It is
// only an allocation; nothing ever sends traffic to it.
var firstServiceIP = net.ParseIP("10.96.0.1")

const serviceCIDR = "10.96.0.0/16"

// pki is the set of files `up` writes under D/pki. Every key is ECDSA P-256: fast to
// generate, and accepted by the API server for TLS and for service-account tokens (ES256).
type pki struct{ dir string }

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// ensure creates the PKI unless D/pki already holds one, so restarting `up` on the same
// directory keeps the etcd data and every credential handed out before valid.
func (p pki) ensure() error {
	if _, err := os.Stat(p.path("done")); err == nil {
		return nil
	}
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	ca, err := newCA("guestcred-lab-ca")
	if err != nil {
		return err
	}
	// requestheader authentication must trust a CA of its own: a client cert from the
	// main CA must not be able to assert arbitrary users through X-Remote-User.
	frontCA, err := newCA("guestcred-lab-front-proxy-ca")
	if err != nil {
		return err
	}
	leaves := []struct {
		name   string
		issuer keyPair
		tmpl   x509.Certificate
	}{
		{"apiserver", ca, x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-apiserver"},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, firstServiceIP},
			DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
				"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		}},
		// The controller manager serves /healthz on its own port; the same CA signs it.
		{"controller-manager-serving", ca, x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-controller-manager"},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
			DNSNames:    []string{"localhost"},
		}},
		{"admin", ca, clientTemplate("kubernetes-admin", "system:masters")},
		{"controller-manager", ca, clientTemplate("system:kube-controller-manager")},
		// The aggregator presents this cert to extension API servers; its CN must be in
		// --requestheader-allowed-names.
		{"front-proxy-client", frontCA, clientTemplate("front-proxy-client")},
	}
	for _, l := range leaves {
		kp, err := sign(l.tmpl, l.issuer)
		if err != nil {
			return fmt.Errorf("%s: %w", l.name, err)
		}
		if err := p.write(l.name, kp); err != nil {
			return err
		}
	}
	if err := p.write("ca", ca); err != nil {
		return err
	}
	if err := p.write("front-proxy-ca", frontCA); err != nil {
		return err
	}
	// Service-account issuer keys: the API server signs tokens with sa.key and checks
	// them with sa.pub; the controller manager signs legacy token Secrets with sa.key.
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if err := writePEM(p.path("sa.key"), "PRIVATE KEY", mustPKCS8(saKey), 0o600); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return err
	}
	if err := writePEM(p.path("sa.pub"), "PUBLIC KEY", pub, 0o644); err != nil {
		return err
	}
	return os.WriteFile(p.path("done"), nil, 0o600)
}

func clientTemplate(cn string, orgs ...string) x509.Certificate {
	return x509.Certificate{
		Subject:     pkix.Name{CommonName: cn, Organization: orgs},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

func newCA(cn string) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, err
	}
	tmpl := baseTemplate(10 * 365 * 24 * time.Hour)
	tmpl.Subject = pkix.Name{CommonName: cn}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return keyPair{}, err
	}
	cert, err := x509.ParseCertificate(der)
	return keyPair{cert, key}, err
}

func sign(t x509.Certificate, issuer keyPair) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, err
	}
	tmpl := baseTemplate(365 * 24 * time.Hour)
	tmpl.Subject = t.Subject
	tmpl.ExtKeyUsage = t.ExtKeyUsage
	tmpl.IPAddresses = t.IPAddresses
	tmpl.DNSNames = t.DNSNames
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.cert, key.Public(), issuer.key)
	if err != nil {
		return keyPair{}, err
	}
	cert, err := x509.ParseCertificate(der)
	return keyPair{cert, key}, err
}

func baseTemplate(validity time.Duration) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    now.Add(-time.Hour), // tolerate small clock differences
		NotAfter:     now.Add(validity),
	}
}

// write stores NAME.crt and NAME.key.
func (p pki) write(name string, kp keyPair) error {
	if err := writePEM(p.path(name+".crt"), "CERTIFICATE", kp.cert.Raw, 0o644); err != nil {
		return err
	}
	return writePEM(p.path(name+".key"), "PRIVATE KEY", mustPKCS8(kp.key), 0o600)
}

func mustPKCS8(key crypto.Signer) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		panic(err) // only for key types this file never creates
	}
	return der
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}
