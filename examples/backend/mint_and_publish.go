// A backend's two jobs with crier, in Go with the standard library only:
//
//	go run mint_and_publish.go token <user>              prints a client token (HS256)
//	go run mint_and_publish.go publish <channel> <json>  publishes through the REST API
//
// Settings from the environment: CRIER_JWT_SECRET (the node's jwt_secret), CRIER_URL
// (e.g. http://127.0.0.1:8080), CRIER_API_KEY (one of the node's api_keys).
// (Not run by the test suite: this machine has no Go toolchain. The Node and Python versions are.)
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"time"
)

func b64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func mintToken(secret, user string, channels, publish []string, ttl time.Duration) (string, error) {
	now := time.Now().Unix()
	header, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	claims, err := json.Marshal(map[string]any{
		"sub": user, "iat": now, "exp": now + int64(ttl.Seconds()), "channels": channels, "publish": publish,
	})
	if err != nil {
		return "", err
	}
	signing := b64url(header) + "." + b64url(claims)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signing))
	return signing + "." + b64url(mac.Sum(nil)), nil
}

func publish(baseURL, apiKey, channel string, data json.RawMessage) (map[string]any, error) {
	body, _ := json.Marshal(map[string]any{"channel": channel, "data": data})
	req, err := http.NewRequest("POST", baseURL+"/api/v1/publish", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+apiKey)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		return nil, err
	}
	if res.StatusCode != 200 {
		return nil, fmt.Errorf("publish failed: %d %v: %v", res.StatusCode, out["error"], out["message"])
	}
	return out, nil // {channel, epoch, offset}
}

func main() {
	switch {
	case len(os.Args) == 3 && os.Args[1] == "token":
		user := os.Args[2]
		tok, err := mintToken(os.Getenv("CRIER_JWT_SECRET"), user, []string{"chat:*", "user:" + user}, []string{"chat:*"}, time.Hour)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(tok)
	case len(os.Args) == 4 && os.Args[1] == "publish":
		out, err := publish(os.Getenv("CRIER_URL"), os.Getenv("CRIER_API_KEY"), os.Args[2], json.RawMessage(os.Args[3]))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		b, _ := json.Marshal(out)
		fmt.Println(string(b))
	default:
		fmt.Fprintln(os.Stderr, "usage: mint_and_publish.go token <user> | publish <channel> <json>")
		os.Exit(2)
	}
}
