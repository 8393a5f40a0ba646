// Renders an Ollama TEMPLATE as Ollama does for a chat request, for tests/test_ollama.py.
//
//	go run tests/ollama_render.go TEMPLATE_FILE < messages.json
//
// Ollama (template/template.go) executes Go's text/template on {"System", "Messages", ...} after
// collating the messages: consecutive messages of one role, tool messages aside, become one whose
// content is theirs joined by a blank line, and System is every system message's, joined so.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	source, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var messages []Message
	if err := json.NewDecoder(os.Stdin).Decode(&messages); err != nil {
		panic(err)
	}
	var system []string
	var collated []*Message
	for i := range messages {
		m := &messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, m)
		}
	}
	tmpl := template.Must(template.New("").Parse(string(source)))
	data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
