// Command go_time_oracle answers, for each JSON string literal on stdin (one per line),
// whether Go's encoding/json accepts it as a time.Time, exactly as AgentAPI decodes the
// "time" of each message in its state file. It prints "ok" or "error" per line.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"time"
)

func main() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for scanner.Scan() {
		var t time.Time
		if err := json.Unmarshal(scanner.Bytes(), &t); err != nil {
			fmt.Fprintln(out, "error")
		} else {
			fmt.Fprintln(out, "ok")
		}
	}
}
